"""Image classification data as uint8 tensors [N, C, H, W] + int64 labels, resized per batch.

Fashion-MNIST is read from the Debian package's IDX files (apt-get install dataset-fashion-mnist),
from --data-dir, or downloaded by torchvision where internet exists; CIFAR through torchvision;
any `train/` + `test/` image folder through torchvision's ImageFolder."""
import gzip
import os

import numpy as np
import torch
import torch.nn.functional as F

FASHION_DIRS = ["/usr/share/datasets/fashion-mnist"]
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "structlora", "data")


def read_idx(path, offset):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(data_dir=None):
    """(train_x, train_y, test_x, test_y) with x: uint8 [N, 1, 28, 28]."""
    dirs = ([data_dir] if data_dir else []) + FASHION_DIRS
    for d in dirs:
        for sub in ("", "FashionMNIST/raw"):
            root = os.path.join(d, sub)
            if all(os.path.isfile(os.path.join(root, f)) for pair in FASHION_FILES.values() for f in pair):
                out = []
                for split in ("train", "test"):
                    images, labels = (os.path.join(root, f) for f in FASHION_FILES[split])
                    out.append(torch.from_numpy(read_idx(images, 16).reshape(-1, 1, 28, 28).copy()))
                    out.append(torch.from_numpy(read_idx(labels, 8).astype(np.int64)))
                return tuple(out)
    try:
        from torchvision.datasets import FashionMNIST
        root = data_dir or CACHE
        train, test = (FashionMNIST(root, train=t, download=True) for t in (True, False))
    except Exception as e:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {dirs} and the download failed ({type(e).__name__}). Get it with "
            "`sudo apt-get install dataset-fashion-mnist` (offline Debian package), or pass --data-dir with "
            "the four *-ubyte.gz files") from e
    return train.data[:, None], train.targets, test.data[:, None], test.targets


def load_cifar(name, data_dir=None):
    from torchvision.datasets import CIFAR10, CIFAR100
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        train, test = (cls(data_dir or CACHE, train=t, download=True) for t in (True, False))
    except Exception as e:
        raise FileNotFoundError(f"{name} is not in {data_dir or CACHE} and could not be downloaded "
                                f"({type(e).__name__}: {e}); pass --data-dir with the extracted python "
                                "version of the dataset") from e
    as_x = lambda d: torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous()
    as_y = lambda d: torch.tensor(d.targets, dtype=torch.int64)
    return as_x(train), as_y(train), as_x(test), as_y(test)


def load_imagefolder(data_dir, size):
    """`data_dir/train/<class>/*` and `data_dir/test/<class>/*` (or val/), held in memory at `size` px."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor, resize
    from tqdm import tqdm
    if not data_dir or not os.path.isdir(os.path.join(data_dir, "train")):
        raise FileNotFoundError(f"--dataset imagefolder needs --data-dir with train/ and test/ (or val/) "
                                f"class folders; got {data_dir!r}")
    test_dir = next((os.path.join(data_dir, s) for s in ("test", "val") if os.path.isdir(os.path.join(data_dir, s))),
                    None)
    if test_dir is None:
        raise FileNotFoundError(f"no test/ or val/ folder in {data_dir}")
    out = []
    for split in (os.path.join(data_dir, "train"), test_dir):
        ds = ImageFolder(split)
        xs = [pil_to_tensor(resize(ds.loader(p).convert("RGB"), [size, size])) for p, _ in tqdm(ds.samples, desc=split)]
        out += [torch.stack(xs), torch.tensor(ds.targets, dtype=torch.int64)]
    return tuple(out)


def load_dataset(name, data_dir=None, size=224):
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir)
    if name == "imagefolder":
        return load_imagefolder(data_dir, size)
    raise ValueError(f"unknown dataset {name!r}")


def few_shot(y, per_class, seed, exclude=None):
    """Indices of `per_class` random examples of every class (all of them if per_class ≤ 0)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)
    if exclude is not None:
        idx = idx[~torch.isin(idx, exclude)]
    if per_class <= 0:
        return idx
    picked = [idx[y[idx] == c][:per_class] for c in y.unique()]
    short = [int(c) for c, p in zip(y.unique(), picked) if len(p) < per_class]
    if short:
        raise ValueError(f"classes {short} have fewer than {per_class} examples left")
    return torch.cat(picked)


def to_pixels(x, size, mean, std, device):
    """uint8 [B, C, h, w] -> normalized float [B, 3, size, size] on `device` (gray repeated to RGB)."""
    x = x.to(device, non_blocking=True).float() / 255
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std
