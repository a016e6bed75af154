"""--quantize nf4 (QLoRA, Dettmers et al. 2023): the frozen decoder's linear layers as bitsandbytes NF4
`Linear4bit` (4-bit NormalFloat, double quantization of the block scales), computing in the base's
--dtype. StructLoRA adapts them like nn.Linear; its merge gives nn.Linear back (structlora.py,
`dequantized_linear`). bitsandbytes is imported only when the flag is used."""
import torch
import torch.nn as nn

from structlora import dequantized_linear, is_linear4bit

PIP = "pip install bitsandbytes==0.50.2"


def add_args(p):
    p.add_argument("--quantize", default=None, choices=["nf4"],
                   help="QLoRA: the decoder blocks' linear layers as 4-bit NF4 (bitsandbytes), computing in --dtype")


def check_args(args):
    """Fails before anything loads: FSDP2 cannot shard bitsandbytes' packed 4-bit weights and their
    quantization state; bitsandbytes must be installed."""
    if not args.quantize:
        return
    if args.fsdp:
        raise SystemExit("--quantize nf4 does not work with --fsdp (FSDP2 cannot shard bitsandbytes' 4-bit weights); "
                         "drop --fsdp: under torchrun each process then holds the whole 4-bit base (DDP)")
    import_bitsandbytes()


def import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as e:
        raise SystemExit(f"--quantize nf4 needs bitsandbytes ({e}): {PIP}") from None
    return bitsandbytes


def nf4(blocks, compute_dtype, device):
    """Replaces every nn.Linear inside `blocks` by an NF4 Linear4bit quantized on `device` (so a 7B base
    loaded on the CPU reaches the GPU 4-bit, one layer at a time). Returns how many it replaced."""
    bnb = import_bitsandbytes()
    linears = [(n, m) for n, m in blocks.named_modules() if type(m) is nn.Linear]
    for name, lin in linears:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        q.load_state_dict(lin.state_dict())
        q.requires_grad_(False)
        # bitsandbytes' CPU inference path (AVX512-BF16) would repack the weights on the first eval forward
        # and compute in bf16: eval would differ from training, and the weights could not be dequantized
        q.support_avx512bf16_for_cpu = False
        parent, _, leaf = name.rpartition(".")
        setattr(blocks.get_submodule(parent), leaf, q.to(device))
    return len(linears)


def dequantize(model):
    """Every Linear4bit left in `model` (the layers StructLoRA did not adapt) as an nn.Linear in its
    compute dtype, so the merged model is an ordinary one (--save-merged, llama.cpp). Returns the count."""
    quantized = [(n, m) for n, m in model.named_modules() if is_linear4bit(m)]
    with torch.no_grad():
        for name, q in quantized:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, dequantized_linear(q).requires_grad_(False))
    return len(quantized)


def weight_bytes(model):
    """Bytes of the model's weights as stored: parameters, buffers and the 4-bit quantization state
    (block scales, their scales), tied tensors once."""
    tensors = {}
    for v in model.state_dict().values():
        if isinstance(v, torch.Tensor):
            tensors[(v.data_ptr(), v.dtype, v.numel())] = v.numel() * v.element_size()
    return sum(tensors.values())


def summary(model, args):
    """metrics.json's "quantization": None without --quantize."""
    if not args.quantize:
        return None
    quantized = [m for m in model.modules() if is_linear4bit(m)]
    return {"type": args.quantize, "double_quant": True,
            "compute_dtype": str(quantized[0].compute_dtype).removeprefix("torch."),
            "linear4bit_layers": len(quantized), "base_weight_bytes": weight_bytes(model)}
