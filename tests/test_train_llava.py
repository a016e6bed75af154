"""train_llava.main() end to end: stage 2 on a tiny random LLaVA checkpoint, and both stages on a VLM
it builds from a tiny Llama and a tiny DINOv2."""
import json

import pytest

import train_llava
from test_llama import tiny_llama, tiny_tokenizer
from test_llava import tiny_llava

transformers = pytest.importorskip("transformers")


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
