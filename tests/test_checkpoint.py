"""--save-every / --resume: a run killed between or during checkpoints and resumed ends with the adapter
of an uninterrupted run; a resume that would train something else stops and names the difference."""
import pytest
import torch

import train_vit
from training.baselines import BASELINES, Baseline
from structlora import StructLoRA

from test_train_vit import tiny  # noqa: F401 (fixture)


class Killed(Exception):
    pass


def flags(tiny):
    """A 10-step train_vit run on the tiny checkpoint, with a checkpoint every 2 steps."""
    return ["--model", str(tiny / "ckpt"), "--dataset", "imagefolder", "--data-dir", str(tiny / "data"), "--image-size",
            "28", "--shots-per-class", "0", "--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--rank", "2",
            "--semantic-every", "1", "--beta", "0.05", "--save-every", "2"]


def run(tiny, out, *extra):
    return train_vit.main(train_vit.parse_args(flags(tiny) + ["--out", str(out), *extra]))


def kill_at(monkeypatch, obj, name, n):
    """Makes the n-th call of obj.name raise Killed (the calls before it run as usual)."""
    real, calls = getattr(obj, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Killed
        return real(*args, **kwargs)
    monkeypatch.setattr(obj, name, dying)


def final_adapter(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["adapter"][0]


def assert_same(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).norm() <= tol * b[k].norm(), k


@pytest.mark.parametrize("method", ["lora", "structlora", "head", "dora",  # head, dora: baselines.py
                                    "structlora --budget=0.5"])  # the budget's multipliers are training state
def test_killed_between_checkpoints_then_resumed_equals_uninterrupted(tiny, tmp_path, monkeypatch, method):
    method, *extra = method.split()
    if method == "dora":
        pytest.importorskip("peft")
    run(tiny, tmp_path / "whole", "--method", method, *extra)
    with monkeypatch.context() as m:
        # dies in step 7 of 10: the last checkpoint is step 6's
        kill_at(m, Baseline if method in BASELINES else StructLoRA, "step", 7)
        with pytest.raises(Killed):
            run(tiny, tmp_path / "killed", "--method", method, *extra)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"] == 6
    m = run(tiny, tmp_path / "other_out", "--method", method, *extra, "--resume", str(tmp_path / "killed"))
    assert m["args"]["out"] == str(tmp_path / "killed") and not (tmp_path / "other_out").exists()
    assert_same(final_adapter(tmp_path / "killed"), final_adapter(tmp_path / "whole"))
    if method == "structlora":  # the state that makes resume exact exists and was restored
        assert any("sketch_ema" in k for k in final_adapter(tmp_path / "whole"))
    if extra:
        assert final_adapter(tmp_path / "whole")["budget_lambda"].sum() > 0


def test_killed_while_saving_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    run(tiny, tmp_path / "whole", "--method", "structlora")
    with monkeypatch.context() as m:
        real_save = torch.save

        def half_written(obj, f):  # the second save dies with half a file written
            if "step" in obj and obj["step"] == 4:
                f.write(b"\x80\x02 half a pickle")
                raise Killed
            real_save(obj, f)
        m.setattr(torch, "save", half_written)
        with pytest.raises(Killed):
            run(tiny, tmp_path / "killed", "--method", "structlora")
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"] == 2
    run(tiny, tmp_path / "killed", "--method", "structlora", "--resume", str(tmp_path / "killed"))
    assert_same(final_adapter(tmp_path / "killed"), final_adapter(tmp_path / "whole"))


def test_resume_of_another_run_names_the_difference(tiny, tmp_path):
    run(tiny, tmp_path / "a", "--method", "ib")
    for extra, message in [(["--rank", "4"], r"--rank 2 \(this run: 4\)"),
                           (["--method", "lora"], r"--method 'ib' \(this run: 'lora'\)"),
                           (["--model", str(tmp_path)], r"--model '.*ckpt' \(this run: '.*'\)")]:
        with pytest.raises(ValueError, match=message):
            run(tiny, tmp_path / "b", "--method", "ib", "--resume", str(tmp_path / "a"), *extra)
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        run(tiny, tmp_path / "b", "--resume", str(tmp_path / "nothing"))


def test_llava_killed_in_stage_2_resumes_both_stages_exactly(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import train_llava
    from test_llama import tiny_tokenizer
    from test_llava import tiny_llava
    from test_train_llava import write_conversations
    tiny_llava(tmp_path / "llava")
    tiny_tokenizer(tmp_path / "llava")
    write_conversations(tmp_path, 7)
    argv = ["--model", str(tmp_path / "llava"), "--data-json", str(tmp_path / "conv.json"), "--eval-json",
            str(tmp_path / "conv.json"), "--image-folder", str(tmp_path / "images"), "--image-size", "28",
            "--stage", "both", "--rank", "2", "--batch-size", "4", "--train-samples", "0", "--epochs", "2",
            "--semantic-every", "1", "--save-every", "1"]
    train_llava.main(train_llava.parse_args(argv + ["--out", str(tmp_path / "whole")]))
    with monkeypatch.context() as m:
        kill_at(m, StructLoRA, "step", 3)  # stage 2, step 3 of 4
        with pytest.raises(Killed):
            train_llava.main(train_llava.parse_args(argv + ["--out", str(tmp_path / "killed")]))
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert (ckpt["stage"], ckpt["step"]) == ("2", 2)
    train_llava.main(train_llava.parse_args(argv + ["--resume", str(tmp_path / "killed")]))
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert_same(resumed["adapter"][0], whole["adapter"][0])
    assert_same(resumed["projector"], whole["projector"])


def test_study_continues_a_killed_run_from_its_checkpoint(tiny, tmp_path, monkeypatch):
    """study.py's long runs (one epoch over 100% of Fashion-MNIST) write checkpoints; a study killed
    mid-run and started again continues that run from its last checkpoint, ending where one go ends."""
    from experiments import study
    args = flags(tiny) + ["--method", "structlora"]
    whole = study.run(train_vit, str(tmp_path / "whole"), args, reduce=lambda m, wall, out: m)
    with monkeypatch.context() as m:
        kill_at(m, StructLoRA, "step", 7)
        with pytest.raises(Killed):
            study.run(train_vit, str(tmp_path / "killed"), args)
    started = []
    with monkeypatch.context() as m:
        real = StructLoRA.step
        m.setattr(StructLoRA, "step", lambda self, *a, **k: (started.append(1), real(self, *a, **k))[1])
        again = study.run(train_vit, str(tmp_path / "killed"), args, reduce=lambda m, wall, out: m)
    assert len(started) == 4  # steps 7..10, not 1..10
    assert again["accuracy"] == pytest.approx(whole["accuracy"])
    assert_same(final_adapter(tmp_path / "killed"), final_adapter(tmp_path / "whole"))


def test_load_checkpoint_returns_the_run_folder_and_leaves_args_alone(tiny, tmp_path):
    """--resume RUN_DIR writes to RUN_DIR: load_checkpoint returns it for main to assign, args keep --out."""
    from training import distributed
    run(tiny, tmp_path / "a", "--method", "lora")
    args = train_vit.parse_args(flags(tiny) + ["--out", str(tmp_path / "b"), "--method", "lora", "--no-bf16",
                                               "--resume", str(tmp_path / "a")])
    ckpt, out = distributed.load_checkpoint(args)
    assert ckpt["step"] == 10 and out == str(tmp_path / "a")
    assert args.out == str(tmp_path / "b")
    args = train_vit.parse_args(flags(tiny) + ["--out", str(tmp_path / "b")])
    assert distributed.load_checkpoint(args) == (None, str(tmp_path / "b"))


@pytest.mark.parametrize("script", ["train_vit", "train_llama", "train_llava"])
def test_bad_run_flags_are_refused_before_anything_loads(script, tmp_path, capsys):
    import importlib
    mod = importlib.import_module(script)
    for flag, value in [("--batch-size", "0"), ("--epochs", "-1"), ("--save-every", "-1")]:
        with pytest.raises((ValueError, SystemExit)) as e:
            mod.main(mod.parse_args([flag, value, "--out", str(tmp_path / "x"), "--device", "cpu"]))
        assert flag in str(e.value) + capsys.readouterr().err, (flag, e.value)  # argparse's error goes to stderr
        assert not (tmp_path / "x").exists()


def test_resume_compares_resolved_paths_and_only_the_flags_given(tiny, tmp_path, monkeypatch):
    import os
    from training import distributed
    run(tiny, tmp_path / "a", "--method", "ib")  # trained on the CPU: bf16 off
    monkeypatch.chdir(tmp_path)
    same_model = ["--model", os.path.relpath(tiny / "ckpt", tmp_path)]  # the same folder, written relative
    args = train_vit.parse_args(["--resume", str(tmp_path / "a"), "--device", "cuda", *same_model])
    args.bf16 = True  # what main() resolves for --device cuda when --bf16 is not given
    _, out = distributed.load_checkpoint(args)
    assert args.bf16 is False and args.method == "ib" and args.rank == 2 and args.epochs == 2  # the run's own
    assert args.device == "cuda" and out == str(tmp_path / "a")
    given = train_vit.parse_args(["--resume", str(tmp_path / "a"), "--bf16", "--rank", "2"])
    with pytest.raises(ValueError, match=r"--bf16 False \(this run: True\)"):
        distributed.load_checkpoint(given)  # a flag the user did pass is compared


def test_resume_of_a_budget_run_saved_before_the_margin_was_a_field_keeps_its_margin(tiny, tmp_path):
    # review-margin: a checkpoint written before --budget-margin existed trained at δ = 0.5 (then a constant);
    # `--resume RUN` alone took today's default 4 and continued the run at another δ
    from training import distributed
    run(tiny, tmp_path / "a", "--method", "ib", "--budget", "0.5", "--epochs", "1", "--save-every", "0")
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["budget_margin"] == 4.0
    del ckpt["args"]["budget_margin"]  # as written before the flag existed
    torch.save(ckpt, tmp_path / "a" / "checkpoint.pt")
    args = train_vit.parse_args(["--resume", str(tmp_path / "a")])
    distributed.load_checkpoint(args)
    assert args.budget_margin == 0.5
    with pytest.raises(ValueError, match=r"--budget-margin 0.5 \(this run: 4.0\)"):
        distributed.load_checkpoint(train_vit.parse_args(["--resume", str(tmp_path / "a"), "--budget-margin", "4"]))
