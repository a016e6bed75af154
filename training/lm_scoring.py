"""Scoring answers by their log-likelihood under a causal LM: what train_llama.py and train_llava.py
share. A `forward(input_ids, attention_mask, logits_at)` returns the logits at the positions of the
bool mask `logits_at`, so one helper serves a text-only decoder and a VLM."""
import torch

from training.common import autocast


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


def answer_logprobs(forward, pairs, pad_id, args):
    """Σ log p(answer tokens | prompt) for each (prompt ids, answer ids) pair."""
    ids, attn, target = (t.to(args.device) for t in collate(pairs, pad_id))
    with autocast(args):
        logits = forward(ids, attn, target)
    labels = ids[:, 1:][target[:, :-1]]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]
    rows = target.nonzero()[:, 0]
    return torch.zeros(len(pairs), device=lp.device).index_add_(0, rows, lp)


def next_token_logits(forward, prompts, pad_id, args):
    """Float logits [len(prompts), vocab] of the token after each prompt, from one right-padded forward."""
    ids, attn, _ = collate([(p, []) for p in prompts], pad_id)
    last = torch.zeros_like(attn, dtype=torch.bool)
    last[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])] = True
    with autocast(args):
        return forward(ids.to(args.device), attn.to(args.device), last.to(args.device)).float()


def candidate_scores(forward, prompts, cand_ids, pad_id, args):
    """Scores of each prompt's candidates. When the candidates' first tokens all differ (yes/no,
    true/false, the easy-VQA answers), one forward per prompt and log p(first token | prompt): exact
    for single-token answers, and the choice greedy decoding would make. Otherwise the full
    log p(candidate | prompt), one forward per (prompt, candidate), in prompt-major order."""
    if all(len({c[0] for c in cs}) == len(cs) for cs in cand_ids):
        logp = torch.log_softmax(next_token_logits(forward, prompts, pad_id, args), -1).cpu()
        return [logp[i, [c[0] for c in cs]] for i, cs in enumerate(cand_ids)]
    pairs = [(p, c) for p, cs in zip(prompts, cand_ids) for c in cs]
    flat, out, k = answer_logprobs(forward, pairs, pad_id, args).cpu(), [], 0
    for cs in cand_ids:
        out.append(flat[k:k + len(cs)])
        k += len(cs)
    return out
