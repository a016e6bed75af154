"""CLIP tower and LLaVA against transformers; train_llava.main end to end on tiny checkpoints."""
import json

import pytest
import torch

import train_llava
from models.clip import load_clip_vision
from models.llava import load_llava
from test_llama import tiny_llama, tiny_tokenizer

from toy import randomize, rel_err

transformers = pytest.importorskip("transformers")


VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=14)


def tiny_llava(folder):
    text = transformers.LlamaConfig(vocab_size=310, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128)
    cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**VISION), text_config=text,
                                   image_token_index=305, projector_hidden_act="gelu", vision_feature_layer=-2)
    hf = randomize(transformers.LlavaForConditionalGeneration(cfg))
    hf.save_pretrained(folder)
    return hf


def test_clip_tower_matches_transformers_penultimate_layer(tmp_path):
    hf = randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
    hf.save_pretrained(tmp_path)
    ours = load_clip_vision(str(tmp_path)).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True).hidden_states
        assert rel_err(ours(x), ref[-2][:, 1:]) < 1e-4
        assert rel_err(ours(x, layer=-1), ref[-2][:, 1:]) > 1e-2  # the layer choice matters


def test_full_clip_model_loads_its_vision_tower(tmp_path):
    cfg = transformers.CLIPConfig(vision_config=VISION, text_config=dict(hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, vocab_size=50), projection_dim=8)
    hf = randomize(transformers.CLIPModel(cfg))
    hf.save_pretrained(tmp_path)
    ours = load_clip_vision(str(tmp_path)).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert rel_err(ours(x), ref) < 1e-4


def test_llava_matches_transformers(tmp_path):
    hf = tiny_llava(tmp_path)
    ours = load_llava(str(tmp_path)).eval()
    ids = torch.randint(0, 300, (2, 10))
    ids[:, 2:6] = 305  # 2×2 patches -> 4 image tokens per image
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert rel_err(ours(ids, x), hf(input_ids=ids, pixel_values=x).logits) < 1e-4
        with pytest.raises(ValueError, match="<image> tokens"):
            ours(ids[:, 3:], x)


def write_conversations(root, n):
    from PIL import Image
    (root / "images").mkdir(exist_ok=True)
    records = []
    for i in range(n):
        Image.new("RGB", (20, 20), (40 * i % 255, 90, 160)).save(root / "images" / f"{i}.png")
        records.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is it?"}, {"from": "gpt", "value": "blue sky"}]})
    (root / "conv.json").write_text(json.dumps(records))


@pytest.mark.parametrize("extra", [(), ("--coordinator", "gcn", "--edges", "chain"), ("--method", "lora+cos")])
def test_train_llava_main_on_tiny_llava_checkpoint(tmp_path, extra):
    tiny_llava(tmp_path / "llava")
    tiny_tokenizer(tmp_path / "llava")
    write_conversations(tmp_path, 6)
    args = train_llava.parse_args(["--model", str(tmp_path / "llava"), "--data-json", str(tmp_path / "conv.json"),
                                   "--eval-json", str(tmp_path / "conv.json"), "--image-folder", str(tmp_path / "images"),
                                   "--image-size", "28", "--stage", "2", "--rank", "2", "--batch-size", "3",
                                   "--train-samples", "0", "--semantic-every", "1", "--out", str(tmp_path / "run"), *extra])
    m = train_llava.main(args)
    assert m["n_train"] == 6 and m["n_eval"] == 6 and m["steps"] == 2
    assert m["merged_accuracy"] == m["accuracy"] and m["merged_prediction_agreement"] == 1.0
    preds = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert len(preds) == 6 and preds[0]["answer"] == "blue sky"
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def tiny_vlm_parts(root):
    """A tiny Llama (+ tokenizer) and a tiny DINOv2 in `root`, as train_llava arguments that build a VLM."""
    tiny_llama(root / "llm", tied=True)
    tiny_tokenizer(root / "llm")
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                    image_size=28, patch_size=14)
    transformers.Dinov2Model(cfg).save_pretrained(root / "vision")
    return ["--vision", str(root / "vision"), "--llm", str(root / "llm"), "--image-size", "28"]


def test_train_llava_builds_a_vlm_and_runs_both_stages(tmp_path):
    pytest.importorskip("easy_vqa")
    args = train_llava.parse_args([*tiny_vlm_parts(tmp_path), "--train-samples", "8", "--eval-samples", "6",
                                   "--batch-size", "4", "--rank", "2", "--method", "lora", "--out", str(tmp_path / "run")])
    m = train_llava.main(args)
    assert m["stage1_steps"] == 2 and m["merged_accuracy"] == m["accuracy"]
    assert (tmp_path / "run" / "projector.safetensors").is_file()
    # stage 2 alone reuses the saved stage-1 projector
    m2 = train_llava.main(train_llava.parse_args(["--vision", str(tmp_path / "vision"), "--llm", str(tmp_path / "llm"),
                                                  "--image-size", "28", "--train-samples", "4", "--eval-samples", "4",
                                                  "--stage", "2", "--projector", str(tmp_path / "run" / "projector.safetensors"),
                                                  "--out", str(tmp_path / "run2")]))
    assert 0 <= m2["accuracy"] <= 1
    with pytest.raises(ValueError, match="needs --projector"):
        train_llava.main(train_llava.parse_args(["--vision", str(tmp_path / "vision"), "--llm", str(tmp_path / "llm"),
                                                 "--image-size", "28", "--stage", "2", "--train-samples", "2",
                                                 "--eval-samples", "2", "--out", str(tmp_path / "run3")]))
