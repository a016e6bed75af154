"""A `tokenizers` BPE tokenizer with what generation needs (eos/bos ids, the chat template), read from
a Hugging Face folder (a GGUF file's vocabulary: models/gguf.py)."""
import os


class Tokenizer:
    """A `tokenizers` BPE tokenizer plus what generation needs: eos/bos ids and the chat template."""

    def __init__(self, tok, eos_token, bos_token=None, add_bos=False, chat_template=None):
        self.tok, self.eos_token, self.bos_token, self.add_bos = tok, eos_token, bos_token, add_bos
        self.eos_id = tok.token_to_id(eos_token)
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.chat_template = chat_template
        if self.eos_id is None:
            raise ValueError(f"eos token {eos_token!r} is not in the vocabulary")

    def encode(self, text, add_bos=None):
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None else []) + ids

    def decode(self, ids, skip_special=True):
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def save_pretrained(self, folder):
        import json
        self.tok.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": self.eos_token, "bos_token": self.bos_token, "add_bos_token": self.add_bos,
                       "chat_template": self.chat_template}, f, indent=1)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """Renders the checkpoint's own Jinja chat template, as transformers does."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        import jinja2

        def raise_exception(msg):
            raise jinja2.TemplateError(msg)
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token, raise_exception=raise_exception)


def tokenizer_from_folder(folder):
    """tokenizer.json + tokenizer_config.json of a Hugging Face folder."""
    import json
    from tokenizers import Tokenizer as HFTokenizer
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    cfg = {}
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            cfg = json.load(f)
    name = lambda t: t["content"] if isinstance(t, dict) else t
    return Tokenizer(HFTokenizer.from_file(path), name(cfg.get("eos_token", "</s>")),
                     name(cfg.get("bos_token")) if cfg.get("bos_token") else None,
                     add_bos=cfg.get("add_bos_token", False), chat_template=cfg.get("chat_template"))
