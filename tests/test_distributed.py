"""Multi-process training under torchrun (2 CPU processes, gloo): DDP and FSDP2 give the one-process
adapter, every rank holds the same graph, a failing rank fails the run, and --resume continues on
another world size. Every run has a timeout and is killed as a whole process group."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import train_llama
import train_vit

from test_train_vit import tiny  # noqa: F401 (fixture)
from toy import rel_err

ROOT = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")


def torchrun(*args, timeout=300):
    """`torchrun --standalone --nproc_per_node 2 *args` in the repository root; (returncode, output).
    The timeout catches a hang (a collective waits for gloo's 30-minute timeout); it is not a speed test:
    on 2 shared, loaded cores two workers importing torch and transformers can take over a minute."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every worker it started
        proc.communicate()
        pytest.fail(f"torchrun {' '.join(map(str, args))} did not finish in {timeout}s")
    return proc.returncode, out


def test_ddp_structlora_builds_one_graph_on_every_rank(tmp_path):
    rc, out = torchrun("tests/ddp_structlora.py", tmp_path / "ranks.json")
    assert rc == 0, out[-3000:]
    r0, r1 = json.loads((tmp_path / "ranks.json").read_text())
    assert r0["adj"] == r1["adj"]
    semantic = [(i, j) for a in r0["adj"].values() for i in range(len(a)) for j in range(i + 2, len(a)) if a[i][j]]
    assert semantic, "no semantic edge was built: the test would not see diverging graphs"
    assert torch.equal(torch.tensor(r0["out"]), torch.tensor(r1["out"]))
    assert r0["open"] == r1["open"] and min(r0["open"].values()) < 4  # the pruned direction is closed
    assert r0["budget_lambda"] == r1["budget_lambda"] and sum(r0["budget_lambda"]) > 0  # from φ, not from a batch
    # The sketches averaged over ranks are the one-process sketches of the global batch (a sum would
    # double the EMA and leave the edges as they are); each rank's loss is a mean over equal halves
    from ddp_structlora import batches, build, state, train
    one = build()
    train(one, one, [(torch.cat([x0, x1]), torch.cat([y0, y1])) for (x0, y0), (x1, y1) in zip(batches(100), batches(101))])
    ref = state(one)
    assert r0["adj"] == ref["adj"]
    for key, ema in ref["ema"].items():
        assert rel_err(torch.tensor(r0["ema"][key]), torch.tensor(ema)) < 1e-4
    # A rank training its own model in its own process group builds the graph of its data alone
    for rank, part in enumerate((r0, r1)):
        alone = build()
        train(alone, alone, batches(200 + rank))
        ref = state(alone)
        assert part["alone"]["adj"] == ref["adj"]
        for key, ema in ref["ema"].items():
            assert rel_err(torch.tensor(part["alone"]["ema"][key]), torch.tensor(ema)) < 1e-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny checkpoint, BoolQ-format data (9 training examples: the last batch of 4 has 1, so one
    rank gets none), and the one-process LoRA run every multi-process run must reproduce."""
    from test_llama import tiny_llama, tiny_tokenizer
    root = tmp_path_factory.mktemp("llama")
    tiny_llama(root / "ckpt", tied=True)
    tiny_tokenizer(root / "ckpt")
    rows = [{"question": f"is item {i} blue", "passage": "The sky is blue.", "answer": i % 3 == 0} for i in range(9)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "dev.json").write_text(json.dumps(rows[:5]))
    argv = ["--model", root / "ckpt", "--task", "boolq", "--train-file", root / "train.jsonl", "--eval-file",
            root / "dev.json", "--train-samples", "0", "--no-chat-template", "--rank", "2", "--batch-size", "4",
            "--epochs", "2", "--lr", "1e-2", "--generations", "1"]
    argv = [str(a) for a in argv]
    for method in ("lora", "structlora"):
        train_llama.main(train_llama.parse_args(argv + ["--method", method, "--semantic-every", "2", "--beta", "0.05",
                                                        "--out", str(root / f"one_{method}")]))
    return root, argv


def adapter(run):
    from safetensors.torch import load_file
    return load_file(Path(run) / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(run, ref, tol=1e-4):
    """Equal tensors, the sketch EMA included: averaged over the ranks it is the one-process one (a sum
    would scale it by the world size, which a resume on another world size would then mix)."""
    a, b = adapter(run), adapter(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).norm() <= tol * b[k].norm(), k


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_lora_on_two_processes_equals_one_process(llama, mode):
    root, argv = llama
    rc, out = torchrun("train_llama.py", *argv, "--method", "lora", "--out", root / mode,
                       *(["--fsdp"] if mode == "fsdp" else []))
    assert rc == 0, out[-3000:]
    assert_same_adapter(root / mode, root / "one_lora")
    m = json.loads((root / mode / "metrics.json").read_text())
    one = json.loads((root / "one_lora" / "metrics.json").read_text())
    assert m["world_size"] == 2 and one["world_size"] == 1 and m["n_eval"] == 5
    assert m["merged_accuracy"] == m["accuracy"] == one["accuracy"]
    assert out.count("written to") == 1  # rank 0 alone reports


def test_fsdp_structlora_merged_equals_adapted(llama):
    root, argv = llama
    rc, out = torchrun("train_llama.py", *argv, "--method", "structlora", "--semantic-every", "2", "--beta", "0.05",
                       "--fsdp", "--out", root / "fsdp_structlora")
    assert rc == 0, out[-3000:]
    m = json.loads((root / "fsdp_structlora" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 6 and m["args"]["fsdp"]
    assert m["merged_accuracy"] == m["accuracy"] and m["merged_prediction_agreement"] == 1.0
    # the gate noise comes from the same generator state on every rank, so even StructLoRA's adapter
    # is the one-process one
    assert_same_adapter(root / "fsdp_structlora", root / "one_structlora")


def test_ddp_structlora_with_semantic_edges_equals_one_process(tiny, tmp_path):
    argv = ["--model", tiny / "ckpt", "--dataset", "imagefolder", "--data-dir", tiny / "data", "--image-size", "28",
            "--shots-per-class", "0", "--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--rank", "2",
            "--semantic-every", "1", "--semantic-threshold", "-1", "--beta", "0.05", "--method", "structlora"]
    train_vit.main(train_vit.parse_args([str(a) for a in argv] + ["--out", str(tmp_path / "one")]))
    rc, out = torchrun("train_vit.py", *argv, "--out", tmp_path / "ddp")
    assert rc == 0, out[-3000:]
    adj = [v for k, v in adapter(tmp_path / "one").items() if k.endswith(".adj")]
    assert any(a.triu(2).any() for a in adj), "no semantic (non-adjacent) edge: the test would not see one"
    assert_same_adapter(tmp_path / "ddp", tmp_path / "one")


class Killed(Exception):
    pass


def test_resume_on_two_processes_continues_a_one_process_run(llama, monkeypatch):
    root, argv = llama
    from structlora import StructLoRA
    real, calls = StructLoRA.step, []

    def step(self):  # the run dies in step 5, after its step-4 checkpoint
        calls.append(1)
        if len(calls) == 5:
            raise Killed
        real(self)
    monkeypatch.setattr(StructLoRA, "step", step)
    args = train_llama.parse_args(argv + ["--method", "lora", "--save-every", "2", "--out", str(root / "killed")])
    with pytest.raises(Killed):
        train_llama.main(args)
    assert torch.load(root / "killed" / "checkpoint.pt", weights_only=True)["step"] == 4
    rc, out = torchrun("train_llama.py", *argv, "--method", "lora", "--save-every", "2", "--resume", root / "killed")
    assert rc == 0, out[-3000:]
    assert_same_adapter(root / "killed", root / "one_lora")
    assert torch.load(root / "killed" / "checkpoint.pt", weights_only=True)["step"] == 6


def test_failing_rank_fails_the_whole_run(tmp_path):
    from test_llama import tiny_tokenizer
    from test_llava import tiny_llava
    from test_train_llava import write_conversations
    tiny_llava(tmp_path / "llava")
    tiny_tokenizer(tmp_path / "llava")
    write_conversations(tmp_path, 4)
    os.remove(tmp_path / "images" / "2.png")  # one rank's share of the first batch
    t0 = time.time()
    rc, out = torchrun("train_llava.py", "--model", tmp_path / "llava", "--data-json", tmp_path / "conv.json",
                       "--eval-json", tmp_path / "conv.json", "--image-folder", tmp_path / "images", "--image-size",
                       "28", "--stage", "2", "--rank", "2", "--batch-size", "4", "--train-samples", "0",
                       "--out", tmp_path / "run")
    assert rc != 0 and "FileNotFoundError" in out and "2.png" in out, out[-3000:]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", out)  # torchrun's summary names the failing rank
    assert time.time() - t0 < 300  # not gloo's 30-minute collective timeout: the failure ended the run


def test_batch_size_the_world_does_not_divide_and_fsdp_without_torchrun_stop_first(llama, monkeypatch):
    root, argv = llama
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--batch-size 3 is not a multiple of the 2 processes"):
        train_llama.main(train_llama.parse_args(argv + ["--batch-size", "3", "--out", str(root / "odd")]))
    assert not (root / "odd").exists()
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="--fsdp shards over processes: launch with torchrun"):
        train_llama.main(train_llama.parse_args(argv + ["--fsdp", "--out", str(root / "odd")]))


def test_global_batches_cut_each_epochs_order_and_draw_every_epoch():
    """One process's batch order: epoch e's shuffle cut into batch_size pieces (the last shorter)."""
    from training import distributed
    orders = iter([[4, 0, 3, 1, 2], [2, 3, 0, 4, 1]])
    batches = distributed.global_batches(list(range(5)), 2, 2, lambda items: next(orders))
    assert batches == [[4, 0], [3, 1], [2], [2, 3], [0, 4], [1]]


def test_setup_in_one_process_returns_the_device_and_leaves_args_alone(monkeypatch):
    from training import distributed
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = train_vit.parse_args(["--device", "cpu"])
    assert distributed.setup(args) == "cpu" and args.device == "cpu"


def test_fsdp_gradient_sync_keeps_a_gradient_no_rank_has_missing(tmp_path):
    import argparse
    import torch.distributed as dist
    from training.distributed import sync_gradients
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
        used.grad = torch.full((3,), 2.0)
        opt = torch.optim.AdamW([used, unused], lr=0.1)
        sync_gradients(opt, argparse.Namespace(fsdp=True))
        assert unused.grad is None and torch.equal(used.grad, torch.full((3,), 2.0))
        opt.step()
        assert torch.equal(unused.data, torch.ones(2))  # no weight decay on a parameter without gradient
    finally:
        dist.destroy_process_group()
