"""StructLoRA on a 4-bit base (QLoRA): bitsandbytes NF4 Linear4bit targets, against the dequantized
weights with a hand-written LoRA branch, PEFT on the dequantized base, and the merge."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bitsandbytes as bnb
from bitsandbytes.functional import dequantize_4bit
from structlora import StructLoRA, StructLoRAConfig
from toy import ToyModel, randomize, randomize_adapters, rel_err

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def nf4(linear):
    """The test's own NF4 copy of an nn.Linear (double quantization, fp32 compute), quantized on CPU."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    q.load_state_dict(linear.state_dict())
    q.support_avx512bf16_for_cpu = False  # the float reference below is not bitsandbytes' bf16 CPU inference path
    return q.to("cpu")


def nf4_toy(seed=0):
    torch.manual_seed(seed)
    model = randomize(ToyModel(), seed)
    for block in model.blocks:
        for name in PROJ:
            setattr(block, name, nf4(getattr(block, name)))
    return model


def dequantized(q):
    return dequantize_4bit(q.weight.data, q.weight.quant_state).float()


class HandLoRA(nn.Module):
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ on a plain float weight: the reference for one adapted layer."""

    def __init__(self, weight, bias, A, B, s):
        super().__init__()
        self.weight, self.bias, self.A, self.B, self.s = weight, bias, A.detach(), B.detach(), s

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.s * F.linear(F.linear(x, self.A), self.B)


def float_copy(model, slora=None):
    """The nf4 toy with every Linear4bit replaced by its dequantized weight (and, given `slora`, the
    adapted ones by HandLoRA with its factors)."""
    ref = nf4_toy()  # the same norms and head (seed 0); its projections are replaced below
    for i, block in enumerate(ref.blocks):
        for name in PROJ:
            q = getattr(model.blocks[i], name)
            q = q.base if hasattr(q, "base") else q
            w = dequantized(q)
            layer = slora.lora_layers.get(f"blocks.{i}.{name}") if slora else None
            if layer is None:
                lin = nn.Linear(w.shape[1], w.shape[0])
                with torch.no_grad():
                    lin.weight.copy_(w)
                    lin.bias.copy_(q.bias)
                setattr(block, name, lin)
            else:
                setattr(block, name, HandLoRA(w, q.bias.detach(), layer.lora_A, layer.lora_B, layer.scaling))
    return ref


def test_nf4_target_forward_equals_dequantized_weight_plus_lora_branch():
    model = nf4_toy()
    slora = StructLoRA(model, StructLoRAConfig(r=4, alpha=8, ib=False, graph=False))
    randomize_adapters(slora)
    assert all(type(layer.base) is bnb.nn.Linear4bit for layer in slora.lora_layers.values())
    ref = float_copy(model, slora)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        want = ref(x)
        assert rel_err(slora.train()(x), want) < 1e-5
        assert rel_err(slora.eval()(x), want) < 1e-5


def test_nf4_gradients_reach_only_the_adapter_and_the_4bit_weights_stay():
    model = nf4_toy()
    slora = StructLoRA(model, StructLoRAConfig(r=4, alpha=8, modules_to_save=("head",)))
    randomize_adapters(slora)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert len(packed) == 4 * 5
    opt = torch.optim.AdamW(slora.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        slora(torch.randn(2, 7, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    slora(torch.randn(2, 7, 16)).square().mean().backward()
    with_grad = [n for n, p in slora.named_parameters() if p.grad is not None]
    adapter = (".lora_A", ".lora_B", ".gate_logits")
    assert with_grad and all(n.endswith(adapter) or n.startswith(("graphs.", "model.head.")) for n in with_grad), with_grad
    assert all(layer.lora_A.grad.abs().sum() > 0 for layer in slora.lora_layers.values())
    for n, p in model.named_parameters():
        if n in packed:
            assert not p.requires_grad and torch.equal(p, packed[n]), n


def test_nf4_merge_gives_plain_linear_in_compute_dtype_and_peft_export_fits_dequantized_base(tmp_path):
    peft = pytest.importorskip("peft")
    model = nf4_toy()
    reference_base = float_copy(model)  # before adaptation: the unquantized HF base PEFT would load on
    slora = StructLoRA(model, StructLoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj"),
                                               graph_layers=2, modules_to_save=("head",)))
    randomize_adapters(slora)
    x = torch.randn(2, 7, 16)
    slora.eval()
    with torch.no_grad():
        adapted = slora(x)
        want = {n: dequantized(layer.base) + layer.delta_weight() for n, layer in slora.lora_layers.items()}
    slora.export_peft(tmp_path / "peft")
    with torch.no_grad():
        reference_base.head.load_state_dict(model.head.state_dict())
    via_peft = peft.PeftModel.from_pretrained(reference_base, tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel_err(via_peft(x), adapted) < 1e-5
    merged = slora.merge_and_unload()
    for name, w in want.items():
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        assert not layer.weight.requires_grad
        assert torch.allclose(layer.weight, w, atol=1e-6), name
    assert type(merged.blocks[0].k_proj) is bnb.nn.Linear4bit  # not adapted: stays 4-bit
    with torch.no_grad():
        assert rel_err(merged(x), adapted) < 1e-5


def one_nf4_lora(n_in, n_out, compute_dtype):
    """(plain LoRA on one NF4 layer named q_proj with random adapters, that Linear4bit)."""
    q = bnb.nn.Linear4bit(n_in, n_out, compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
    q.load_state_dict(nn.Linear(n_in, n_out).state_dict())
    model = nn.Sequential()
    model.add_module("q_proj", q.to("cpu"))
    slora = StructLoRA(model, StructLoRAConfig(r=2, alpha=4, ib=False, graph=False, target_modules=("q_proj",)))
    randomize_adapters(slora)
    return slora, q


def test_nf4_merge_in_bf16_compute_dtype():
    slora, q = one_nf4_lora(16, 8, torch.bfloat16)
    with torch.no_grad():
        want = (dequantized(q) + slora.lora_layers["q_proj"].delta_weight()).to(torch.bfloat16)
    merged = slora.merge_and_unload()
    assert type(merged.q_proj) is nn.Linear and merged.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(merged.q_proj.weight, want)


def test_nf4_target_computes_in_eval_what_it_computes_in_training_on_cpu():
    """bitsandbytes' CPU inference path (AVX512-BF16: bf16 block scales, bf16 matmul) would make the
    eval forward differ from training's and the weights undequantizable; StructLoRA turns it off."""
    slora, q = one_nf4_lora(64, 32, torch.float32)
    layer = slora.lora_layers["q_proj"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = HandLoRA(dequantized(q), q.bias, layer.lora_A, layer.lora_B, layer.scaling)(x)
        assert rel_err(slora.eval()(x), want) < 1e-6
        assert rel_err(slora.eval()(x), want) < 1e-6
    assert rel_err(slora.merge_and_unload()(x), want) < 1e-6


def test_nf4_target_repacked_for_cpu_inference_is_refused():
    lin = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    model = nn.Sequential()
    model.add_module("q_proj", q.to("cpu"))
    q.support_avx512bf16_for_cpu = True  # as on a CPU that has AVX512-BF16
    with torch.no_grad():
        model.eval()(torch.randn(3, 64))
    with pytest.raises(ValueError, match="repacked"):
        StructLoRA(model, StructLoRAConfig(r=2, alpha=4, ib=False, graph=False, target_modules=("q_proj",)))


# ----------------------------------------------------------------------------------------------
# train_llama.py --quantize nf4 on a tiny Hugging Face checkpoint written here

@pytest.fixture(scope="module")
def tiny_llama_run(tmp_path_factory):
    """A tiny HF checkpoint, BoolQ-format data, and the argv of a 6-step --quantize nf4 run on them."""
    from test_llama import tiny_tokenizer
    from test_train_llama import boolq_args
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("qlora")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, rope_theta=5000.0,
                                   max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5)
    randomize(transformers.LlamaForCausalLM(cfg)).save_pretrained(root / "ckpt")
    tiny_tokenizer(root / "ckpt")
    argv = ["--model", str(root / "ckpt"), *boolq_args(root), "--train-samples", "0", "--no-chat-template",
            "--rank", "2", "--batch-size", "4", "--epochs", "2", "--lr", "1e-2", "--semantic-every", "1",
            "--beta", "0.05", "--generations", "1", "--quantize", "nf4"]
    return root, argv


def test_train_llama_nf4_trains_and_merged_folder_loads_in_transformers_as_the_adapted_model(tiny_llama_run):
    import train_llama
    from transformers import AutoModelForCausalLM
    root, argv = tiny_llama_run
    args = train_llama.parse_args(argv + ["--save-merged", "--export-peft", "--out", str(root / "run")])
    m = train_llama.main(args)
    q = m["quantization"]
    assert q["type"] == "nf4" and q["double_quant"] and q["compute_dtype"] == "float32"
    assert q["linear4bit_layers"] == 2 * 7  # every linear layer of both blocks; lm_head and embeddings stay
    assert m["steps"] == 6 and m["merged_accuracy"] == m["accuracy"] and m["merged_prediction_agreement"] == 1.0
    n_base = sum(p.numel() for p in train_llama.load_llama(str(root / "ckpt")).parameters())  # unquantized count
    assert m["trainable_share"] == pytest.approx(m["trainable_params"] / (m["trainable_params"] + n_base))
    # the adapted model, rebuilt on a freshly quantized base, against the saved merged folder
    base = train_llama.load_base(args)
    assert sum(is_4bit for is_4bit in (type(x) is bnb.nn.Linear4bit for x in base.modules())) == 14
    adapted = StructLoRA.from_pretrained(base, str(root / "run" / "adapter")).eval()
    hf = AutoModelForCausalLM.from_pretrained(root / "run" / "merged").eval()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert rel_err(hf(input_ids=ids).logits, adapted(ids)) < 1e-5
        assert rel_err(hf(input_ids=ids).logits, train_llama.load_llama(str(root / "ckpt"))(ids)) > 1e-3  # it trained


def test_train_llama_nf4_resumes_exactly(tiny_llama_run, monkeypatch):
    import train_llama
    from test_checkpoint import Killed, assert_same, final_adapter, kill_at
    root, argv = tiny_llama_run
    run = lambda out, *extra: train_llama.main(train_llama.parse_args(argv + ["--save-every", "2", "--out", str(out),
                                                                              *extra]))
    run(root / "whole")
    with monkeypatch.context() as m:
        kill_at(m, StructLoRA, "step", 5)  # dies in step 5 of 6: the last checkpoint is step 4's
        with pytest.raises(Killed):
            run(root / "killed")
    assert torch.load(root / "killed" / "checkpoint.pt", weights_only=True)["step"] == 4
    run(root / "other", "--resume", str(root / "killed"))
    assert_same(final_adapter(root / "killed"), final_adapter(root / "whole"))
    from training import distributed  # a resume without the flag continues the run's own 4-bit base
    args = train_llama.parse_args([a for a in argv if a not in ("--quantize", "nf4")] + ["--resume", str(root / "killed")])
    assert args.quantize is None
    distributed.load_checkpoint(args)
    assert args.quantize == "nf4"


def test_quantize_bad_combinations_stop_with_one_clear_message(tiny_llama_run, monkeypatch, capsys):
    import sys
    import train_llama
    import train_llava
    import train_vit
    root, argv = tiny_llama_run
    with pytest.raises(SystemExit, match="--fsdp"):
        train_llama.main(train_llama.parse_args(argv + ["--fsdp", "--out", str(root / "x")]))
    with pytest.raises(SystemExit, match="--fsdp"):
        train_llava.main(train_llava.parse_args(["--quantize", "nf4", "--fsdp"]))
    with pytest.raises(SystemExit):
        train_vit.parse_args(["--quantize", "nf4"])
    assert "unrecognized arguments: --quantize nf4" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(SystemExit, match=r"pip install bitsandbytes==0\.50\.2"):
        train_llama.main(train_llama.parse_args(argv + ["--out", str(root / "y")]))
    assert not (root / "x").exists() and not (root / "y").exists()


def test_train_llava_nf4_quantizes_the_decoder_only_and_saves_an_ordinary_merged_model(tmp_path):
    import train_llava
    from test_llama import tiny_tokenizer
    from test_llava import tiny_llava
    from test_train_llava import write_conversations
    transformers = pytest.importorskip("transformers")
    source = tiny_llava(tmp_path / "llava")
    tiny_tokenizer(tmp_path / "llava")
    write_conversations(tmp_path, 6)
    args = train_llava.parse_args(["--model", str(tmp_path / "llava"), "--data-json", str(tmp_path / "conv.json"),
                                   "--eval-json", str(tmp_path / "conv.json"), "--image-folder", str(tmp_path / "images"),
                                   "--image-size", "28", "--stage", "2", "--rank", "2", "--batch-size", "3",
                                   "--train-samples", "0", "--quantize", "nf4", "--save-merged",
                                   "--out", str(tmp_path / "run")])
    m = train_llava.main(args)
    assert m["quantization"]["linear4bit_layers"] == 2 * 7  # the decoder's blocks; not the tower, not the projector
    assert m["merged_accuracy"] == m["accuracy"] and m["merged_prediction_agreement"] == 1.0
    merged = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "run" / "merged").state_dict()
    src = source.state_dict()
    k = "model.language_model.layers.1.self_attn.k_proj.weight"  # not adapted: W0 through NF4 and back
    want = dequantized(nf4(source.model.language_model.layers[1].self_attn.k_proj))
    assert torch.allclose(merged[k], want, atol=1e-6) and not torch.allclose(merged[k], src[k], atol=1e-3)
    tower = [n for n in src if ".vision_tower." in n and n.endswith("k_proj.weight")]
    assert tower and all(torch.equal(merged[n], src[n]) for n in tower)  # the tower stayed in --dtype


def test_ddp_nf4_lora_on_two_processes_equals_one_process(tiny_llama_run):
    import train_llama
    from test_distributed import assert_same_adapter, torchrun
    root, argv = tiny_llama_run
    train_llama.main(train_llama.parse_args(argv + ["--method", "lora", "--out", str(root / "one_lora")]))
    rc, out = torchrun("train_llama.py", *argv, "--method", "lora", "--out", root / "ddp_lora")
    assert rc == 0, out[-3000:]
    assert_same_adapter(root / "ddp_lora", root / "one_lora")
    m = json.loads((root / "ddp_lora" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["quantization"]["linear4bit_layers"] == 14


def test_transformers_model_loaded_in_4bit_is_adapted_and_merged(tmp_path):
    """A user's model from transformers with BitsAndBytesConfig(load_in_4bit=True): every linear layer
    of the blocks adapted (bitsandbytes' CPU eval path would repack a layer left 4-bit), merged = adapted."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    randomize(transformers.LlamaForCausalLM(cfg)).save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    slora = StructLoRA(model, StructLoRAConfig(r=2, alpha=4, target_modules=targets))
    assert len(slora.lora_layers) == 14 and all(type(l.base) is bnb.nn.Linear4bit for l in slora.lora_layers.values())
    randomize_adapters(slora)
    ids = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        adapted = slora.eval()(input_ids=ids).logits
        merged = slora.merge_and_unload()
        assert rel_err(merged(input_ids=ids).logits, adapted) < 1e-5
    assert not any(type(m) is bnb.nn.Linear4bit for m in merged.modules())
