"""One plain loader for every model family: a local folder, a Hugging Face hub id, or a named
offline source converted once into a cache folder. Checkpoints are safetensors (sharded or not)
in the Hugging Face layout; keys are renamed by a visible table in each model file."""
import json
import os
import re

import torch

CACHE = os.environ.get("STRUCTLORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "structlora"))


def resolve(source, offline=None):
    """Returns a local folder for `source`: a folder, an offline name (converted once), or a hub id."""
    offline = offline or {}
    if os.path.isdir(source):
        return source
    if source in offline:
        folder = os.path.join(CACHE, re.sub(r"[^A-Za-z0-9_.-]", "_", source))
        if not os.path.isfile(os.path.join(folder, "config.json")):
            print(f"converting offline source {source!r} once into {folder}")
            offline[source](folder)
        return folder
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise FileNotFoundError(f"{source!r} is neither a folder, a hub id (org/name), nor an offline source "
                                f"({', '.join(offline) or 'none'})")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("downloading from the hub needs `pip install huggingface_hub`") from None
    try:
        return snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:
        raise RuntimeError(f"could not download {source!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                           f"Without internet, pass a local folder or one of: {', '.join(offline) or 'none'}") from e


def read_config(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder}")
    with open(path) as f:
        return json.load(f)


def load_safetensors(folder):
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(folder, shard)))
        return state
    found = sorted(os.listdir(folder))
    raise FileNotFoundError(f"no model.safetensors(.index.json) in {folder} (found {found[:10]}); "
                            "convert .bin checkpoints to safetensors first")


def rename(key, table):
    """Looks `key` up in a {hf_name: our_name} table whose layer index is written `{}`."""
    m = re.search(r"\.(\d+)\.", key)
    if m:
        pattern = key[:m.start()] + ".{}." + key[m.end():]
        if pattern in table:
            return table[pattern].format(m.group(1))
    return table.get(key)


def hf_name(key, table, accept=lambda hf: True):
    """Our name -> the Hugging Face name: `table` read backwards. `accept` picks one HF name where
    several share our name (ViT's and DINOv2's layer names both map to norm1, mlp.fc1, ...)."""
    m = re.search(r"\.(\d+)\.", key)
    pattern = key[:m.start()] + ".{}." + key[m.end():] if m else key
    hits = [hf for hf, ours in table.items() if ours == pattern and accept(hf)]
    if len(hits) != 1:
        raise KeyError(f"{key} has {len(hits)} Hugging Face names in the table: {hits}")
    return hits[0].format(m.group(1)) if m else hits[0]


def module_renamer(key_fn):
    """Our module path -> the Hugging Face one, from a parameter-name renamer (a module is named as its weight is)."""
    return lambda name: key_fn(name + ".weight").removesuffix(".weight")


def base_name(source, offline):
    """What an exported adapter names as its base model: the hub id, the absolute folder, or for an
    offline source the folder it was converted into (a Hugging Face folder transformers loads)."""
    if source in offline:
        return resolve(source, offline)
    return os.path.abspath(source) if os.path.exists(source) else source


def save_folder(folder, config, state, copy_from=None, files=()):
    """A Hugging Face checkpoint folder: config.json, model.safetensors (a tensor shared by two keys,
    e.g. tied embeddings, must appear once), and `files` copied from the folder `copy_from` where present."""
    import shutil
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    for name in files:
        if copy_from and os.path.isfile(os.path.join(copy_from, name)):
            shutil.copy(os.path.join(copy_from, name), os.path.join(folder, name))


def load_into(model, state, table, prefixes=(), ignore=(), skip=()):
    """Renames `state` with `table` and copies it into `model`; any missing, unexpected or
    mis-shaped key stops with its name. Keys matching `ignore` (regexes) are dropped, our keys in
    `skip` (e.g. a new head) are left as initialised."""
    ours = model.state_dict()
    mapped, unexpected = {}, []
    for key, value in state.items():
        short = next((key[len(p):] for p in prefixes if key.startswith(p)), key)
        if any(re.fullmatch(pat, short) for pat in ignore):
            continue
        name = rename(short, table)
        if name in ours:
            mapped[name] = value
        else:
            unexpected.append(key)
    missing = [k for k in ours if k not in mapped and k not in skip]
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
           for k, v in mapped.items() if v.shape != ours[k].shape and k not in skip]
    if missing or unexpected or bad:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}:\n  missing: {missing[:10]}\n"
                         f"  unexpected: {unexpected[:10]}\n  mis-shaped: {bad[:10]}")
    with torch.no_grad():
        for k, v in mapped.items():
            if k not in skip:
                ours[k].copy_(v.to(ours[k].dtype))
