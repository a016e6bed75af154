"""train_llama.main() end to end on a tiny random Llama checkpoint and BoolQ-format data; the
fine-foods reader."""
import json

import pytest

import train_llama
from test_llama import tiny_llama, tiny_tokenizer

transformers = pytest.importorskip("transformers")


def boolq_args(root):
    """A tiny BoolQ-format train (12 rows) / dev (5 rows) pair written into `root`, as train_llama arguments."""
    rows = [{"question": f"is item {i} blue", "passage": "The sky is blue.", "answer": i % 2 == 0} for i in range(12)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "dev.json").write_text(json.dumps(rows[:5]))
    return ["--task", "boolq", "--train-file", str(root / "train.jsonl"), "--eval-file", str(root / "dev.json")]


@pytest.mark.parametrize("extra", [(), ("--coordinator", "gcn", "--graph-layers", "2", "--edges", "semantic"),
                                   ("--method", "lora+laplacian")])
def test_train_llama_main_on_tiny_checkpoint(tmp_path, extra):
    tiny_llama(tmp_path / "ckpt", tied=True)
    tiny_tokenizer(tmp_path / "ckpt")
    args = train_llama.parse_args(["--model", str(tmp_path / "ckpt"), *boolq_args(tmp_path),
                                   "--train-samples", "0", "--no-chat-template", "--rank", "2", "--batch-size", "4",
                                   "--epochs", "2", "--semantic-every", "1", "--out", str(tmp_path / "run"), *extra])
    m = train_llama.main(args)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["n_train"] == 12 and saved["n_eval"] == 5 and saved["steps"] == 6
    assert m["merged_accuracy"] == m["accuracy"] and m["merged_prediction_agreement"] == 1.0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="no data file"):
        train_llama.main(train_llama.parse_args(["--task", "piqa", "--train-file", str(tmp_path / "none.json")]))


def test_fine_foods_reader():
    from training.text_data import load_fine_foods
    try:
        train, test = load_fine_foods()
    except FileNotFoundError:
        pytest.skip("r-cran-modeldata is not unpacked")
    assert len(train) == 4000 and len(test) == 1000
    assert sum(e["answer"] == "yes" for e in train) == 2600


def test_train_llama_epochs_0_scores_the_base_model(tmp_path, monkeypatch):
    """--epochs 0: no training step; the adapter starts at B = 0, so the picks are the bare base model's
    (scored here without any adapter), the "no adapter" row of the study's LLaMA table."""
    tiny_llama(tmp_path / "ckpt", tied=True)
    tiny_tokenizer(tmp_path / "ckpt")
    args = train_llama.parse_args(["--model", str(tmp_path / "ckpt"), *boolq_args(tmp_path), "--train-samples", "0",
                                   "--no-chat-template", "--rank", "2", "--batch-size", "4", "--epochs", "0",
                                   "--generations", "0", "--out", str(tmp_path / "run")])
    seen, real = {}, train_llama.evaluate
    monkeypatch.setattr(train_llama, "evaluate", lambda model, ex, tok, a, desc: seen.setdefault(desc, real(model, ex, tok, a, desc)))
    m = train_llama.main(args)
    base = train_llama.load_llama(str(tmp_path / "ckpt"))
    tok = train_llama.load_tokenizer(str(tmp_path / "ckpt"))
    _, test = train_llama.load_text_task("boolq", None, args.train_file, args.eval_file)
    assert train_llama.evaluate(base, test[:args.eval_samples], tok, args, "base") == seen["eval adapted"]
    assert m["steps"] == 0 and m["merged_prediction_agreement"] == 1.0


def test_train_llama_refuses_negative_epochs():
    with pytest.raises(SystemExit):
        train_llama.parse_args(["--epochs", "-1"])


def test_kl_is_weighted_by_the_answer_tokens_the_task_loss_averages(tmp_path, monkeypatch):
    # review20: the task loss is a mean over answer tokens (answer + eos), so the ELBO's data-set KL enters each
    # step as KL / (answer tokens in the training set); N = examples weighed it (mean answer length)× too much
    from models.llama import load_tokenizer
    tiny_llama(tmp_path / "ckpt", tied=True)
    tiny_tokenizer(tmp_path / "ckpt")
    args = train_llama.parse_args(["--model", str(tmp_path / "ckpt"), *boolq_args(tmp_path), "--train-samples", "0",
                                   "--no-chat-template", "--rank", "2", "--out", str(tmp_path / "run")])
    seen = {}

    def stop(model, a, total, n, **kw):
        seen["n"] = n
        raise KeyboardInterrupt

    monkeypatch.setattr(train_llama, "make_adapter", stop)
    with pytest.raises(KeyboardInterrupt):
        train_llama.main(args)
    from training.text_data import load_text_task
    tok = load_tokenizer(args.model)
    train, _ = load_text_task("boolq", None, args.train_file, args.eval_file)
    tokens = sum(len(train_llama.encode(tok, ex, args)[1]) for ex in train)
    assert tokens > len(train) and seen["n"] == tokens
