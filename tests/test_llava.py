"""CLIP tower and LLaVA against transformers (train_llava.py: test_train_llava.py)."""
import pytest
import torch

from models.clip import load_clip_vision
from models.llava import load_llava

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
