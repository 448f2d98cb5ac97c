"""Checkpoints and exact resume, Ctrl-C, divergence, metrics.jsonl, the loss plot and --report-to."""
import json
import signal
import struct
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, run_lora

import lora
from utils import UserError

# dropout, a schedule with warmup and accumulation over an epoch's end (64 examples: 16 batches of 4) all
# carry state that an exact resume must restore
RECIPE = ["--batch-size", 4, "--lora-layers", 2, "--lora-rank", 4, "--lora-dropout", 0.1, "--learning-rate", 3e-3,
          "--lr-schedule", "cosine", "--warmup", 3, "--grad-accumulation-steps", 3, "--eval-on-start",
          "--steps-per-eval", 1000,
          "--val-batches", 1, "--steps-per-report", 1, "--seed", 7]


def train_flags(model, data, folder, iters, *more):
    return ["--model", model, "--data", data, "--train", *RECIPE, "--iters", iters,
            "--adapter-file", folder / "adapters.safetensors", *more]


def weights(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a), max(np.abs(a[k] - b[k]).max() for k in a)


def test_resume_from_a_checkpoint_is_exact(tiny_llama, data_dir, tmp_path, capsys):
    whole = tmp_path / "whole"
    run_lora(capsys, *train_flags(tiny_llama, data_dir, whole, 10, "--save-every", 5))
    checkpoint = whole / "runs" / "1" / "step-0000005"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "adapter_config.json", "adapters.safetensors", "optimizer.safetensors", "trainer_state.json"]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["iteration"] == 5 and state["batches"] == 15

    resumed = tmp_path / "resumed"
    out = run_lora(capsys, *train_flags(tiny_llama, data_dir, resumed, 10, "--resume", checkpoint))
    assert "resuming from" in out and "Iter 5:" not in out and "Iter 6: Train loss" in out
    assert_same(weights(resumed / "adapters.safetensors"), weights(whole / "adapters.safetensors"))
    # what is restored matters: the same five steps from fresh adapters end elsewhere
    fresh = tmp_path / "fresh"
    run_lora(capsys, *train_flags(tiny_llama, data_dir, fresh, 5))
    assert not np.allclose(weights(fresh / "adapters.safetensors")["model.layers.3.self_attn.q_proj.lora_b"],
                           weights(whole / "adapters.safetensors")["model.layers.3.self_attn.q_proj.lora_b"])

    # a checkpoint is an adapter folder: --adapter-file reads it
    out = run_lora(capsys, "--model", tiny_llama, "--data", data_dir, "--test", "--adapter-file", checkpoint)
    assert "Test ppl" in out
    # flags that change the result are the checkpoint's, or knowingly accepted
    with pytest.raises(UserError, match=r"trained with other flags: --lora-rank 4 \(now 8\), --learning-rate "
                                        r"0.003 \(now 0.01\); .*--accept-flag-changes"):
        run_lora(capsys, *train_flags(tiny_llama, data_dir, tmp_path / "other", 10, "--resume", checkpoint,
                                      "--lora-rank", 8, "--learning-rate", 0.01))
    with pytest.raises(UserError, match="do not fit the model"):
        run_lora(capsys, *train_flags(tiny_llama, data_dir, tmp_path / "other", 10, "--resume", checkpoint,
                                      "--lora-rank", 8, "--accept-flag-changes"))
    with pytest.raises(UserError, match="not a checkpoint folder"):
        run_lora(capsys, *train_flags(tiny_llama, data_dir, tmp_path / "other", 10, "--resume", tmp_path))


@pytest.mark.parametrize("optimizer, state", [("adafactor", "exp_avg_sq_row"), ("sgd", "v"), ("muon", "v"),
                                              ("lion", "m")])
def test_each_optimizer_resumes_exactly(tiny_llama, data_dir, tmp_path, capsys, optimizer, state):
    """A run resumed from a checkpoint makes the losses of the uninterrupted run: the optimizer's own state, and
    its step (the warmup's), come back from optimizer.safetensors."""
    flags = ["--optimizer", optimizer, "--weight-decay", 0.01, "--save-every", 3]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_lora(capsys, *train_flags(tiny_llama, data_dir, whole, 6, *flags))
    checkpoint = whole / "runs" / "1" / "step-0000003"
    assert any(k.endswith(f"lora_b.{state}") for k in mx.load(str(checkpoint / "optimizer.safetensors")))
    run_lora(capsys, *train_flags(tiny_llama, data_dir, resumed, 6, *flags, "--resume", checkpoint))

    def losses(folder):
        return {r["iteration"]: r["train_loss"] for r in lora.read_metrics(folder / "runs" / "1" / "metrics.jsonl")
                if "train_loss" in r}

    assert list(losses(resumed)) == list(range(1, 7))
    assert losses(resumed) == pytest.approx(losses(whole), abs=1e-6)
    assert_same(weights(resumed / "adapters.safetensors"), weights(whole / "adapters.safetensors"))


def test_early_stopping_keeps_the_best_adapters_and_resumes_its_patience(tiny_llama, data_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """Validation losses 3, 2, 2.5, 1.99, 2.1, 2.2 (scripted: validation reads 2 batches, the check before a save
    1): with a patience of 2 the run stops at iteration 6, and the best adapters, of iteration 4, are beside the
    last and in the run's best/ folder. Resumed from iteration 5, the run has one validation of patience left and
    the best loss to beat; with a threshold of 0.05, 1.99 is the best but no improvement."""
    evaluate = lora.evaluate

    def scripted(*losses):
        left = iter(losses)
        monkeypatch.setattr(lora, "evaluate", lambda model, data, size, batches, *more: (
            (next(left), {}) if batches == 2 else evaluate(model, data, size, batches, *more)))

    folder = tmp_path / "run"
    flags = ["--val-batches", 2, "--eval-on-start", "--steps-per-eval", 1, "--save-every", 1, "--keep-checkpoints", 0,
             "--early-stopping-patience", 2]
    scripted(3.0, 2.0, 2.5, 1.99, 2.1, 2.2)
    out = run_lora(capsys, *train_flags(tiny_llama, data_dir, folder, 10, *flags))
    assert "Iter 6: Early stopping: 2 validations" in out and "Iter 7" not in out
    run = folder / "runs" / "1"
    for best in (folder / "adapters.best.safetensors", run / "best" / "adapters.safetensors"):
        assert_same(weights(best), weights(run / "step-0000004" / "adapters.safetensors"))
    assert_same(weights(folder / "adapters.safetensors"), weights(run / "step-0000006" / "adapters.safetensors"))
    state = json.loads((run / "step-0000006" / "trainer_state.json").read_text())
    assert (state["best_metric"], state["best_global_step"], state["early_stopping_patience_counter"]) == (1.99, 4, 2)
    assert (run / "loss.png").exists()

    scripted(2.2, 2.3)  # (a resumed run that forgot the patience count would stop at 7, the best loss: save 2.2)
    out = run_lora(capsys, *train_flags(tiny_llama, data_dir, folder, 10, *flags, "--resume", run / "step-0000005"))
    assert "Iter 6: Early stopping" in out and "Iter 7" not in out
    assert_same(weights(folder / "adapters.best.safetensors"), weights(run / "step-0000004" / "adapters.safetensors"))

    scripted(3.0, 2.0, 2.5, 1.99)
    out = run_lora(capsys, *train_flags(tiny_llama, data_dir, tmp_path / "threshold", 10, *flags,
                                        "--early-stopping-threshold", 0.05))
    assert "Iter 4: Early stopping" in out and "of iteration 4 (validation loss 1.990)" in out


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tiny_llama, data_dir, tmp_path, capsys):
    whole = tmp_path / "whole"
    run_lora(capsys, *train_flags(tiny_llama, data_dir, whole, 200, "--save-every", 1000))

    stopped = tmp_path / "stopped"
    child = subprocess.Popen([sys.executable, str(ROOT / "lora.py"),
                              *map(str, train_flags(tiny_llama, data_dir, stopped, 200, "--save-every", 1000))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    for line in child.stdout:
        if line.startswith("Iter 3: Train loss"):
            child.send_signal(signal.SIGINT)
            break
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "Traceback" not in err
    interrupted = int(out.split("Interrupted at iteration ")[1].split(".")[0])
    assert 3 <= interrupted < 200
    checkpoint = stopped / "runs" / "1" / f"step-{interrupted:07d}"
    assert f"--resume {checkpoint}" in out and (stopped / "adapters.safetensors").exists()
    assert "The best adapters, of iteration 1 (validation loss" in err  # validated at iteration 1

    run_lora(capsys, *train_flags(tiny_llama, data_dir, stopped, 200, "--save-every", 1000, "--resume", checkpoint))
    assert_same(weights(stopped / "adapters.safetensors"), weights(whole / "adapters.safetensors"))
    # the resumed run's metrics.jsonl holds each iteration once, the interrupted run's then its own
    iterations = [r["iteration"] for r in lora.read_metrics(stopped / "runs" / "2" / "metrics.jsonl")
                  if "train_loss" in r]
    assert iterations == list(range(1, 201))


def test_divergence_keeps_the_last_good_checkpoint(tiny_llama, data_dir, tmp_path, capsys, monkeypatch):
    """A learning rate poisoned from the third update on: the loss of iteration 4 is NaN."""
    schedule = lora.learning_rate_schedule
    monkeypatch.setattr(lora, "learning_rate_schedule",
                        lambda args: lambda step: mx.where(step < 2, schedule(args)(step), mx.nan))
    folder = tmp_path / "run"
    with pytest.raises(UserError, match=r"iteration 4: the loss is nan; training stopped \(.*adapters.safetensors "
                                        r"and .*step-0000002 hold the adapters saved last, whose loss was finite\)\. "
                                        r"The best adapters, of iteration 1 .* are in .*adapters.best.safetensors"):
        run_lora(capsys, *train_flags(tiny_llama, data_dir, folder, 10, "--save-every", 2))
    for path in (folder / "adapters.safetensors", folder / "runs" / "1" / "step-0000002" / "adapters.safetensors",
                 folder / "adapters.best.safetensors"):
        assert all(np.isfinite(v).all() for v in weights(path).values())
    assert not (folder / "runs" / "1" / "step-0000004").exists()


def test_a_model_that_overflows_is_not_blamed_on_the_learning_rate(tiny_llama, data_dir, tmp_path, capsys):
    """Finite weights whose loss is not (the final norm's output overflows the logits): the error says so at
    iteration 1, before any update."""
    import shutil

    folder = shutil.copytree(tiny_llama, tmp_path / "model")
    weights = dict(mx.load(str(folder / "model.safetensors")))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1e38
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"iteration 1: the loss is inf before any update; training stopped \(this "
                                        r"run saved nothing\)\. Not the learning rate"):
        run_lora(capsys, *train_flags(folder, data_dir, tmp_path / "run", 4))
    assert not (tmp_path / "run" / "runs" / "1" / "loss.png").exists()  # no plot of nothing


def test_metrics_plot_and_kept_checkpoints(tiny_llama, data_dir, tmp_path, capsys):
    import matplotlib.image

    run_lora(capsys, *train_flags(tiny_llama, data_dir, tmp_path, 12, "--save-every", 2, "--keep-checkpoints", 2,
                                  "--steps-per-report", 4, "--eval-on-start", "--steps-per-eval", 6))
    folder = tmp_path / "runs" / "1"
    records = lora.read_metrics(folder / "metrics.jsonl")
    train = [r for r in records if "train_loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["iteration"] for r in train] == [4, 8, 12] and [r["iteration"] for r in val] == [1, 6, 12]
    assert all(r["tokens_per_second"] > 0 and r["peak_memory_gb"] > 0 and r["learning_rate"] > 0 for r in train)
    assert train[-1]["trained_tokens"] > train[0]["trained_tokens"] > 0
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-0000010", "step-0000012"]
    image = matplotlib.image.imread(folder / "loss.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image[..., :3].std() > 0.05  # curves, not a blank


def tensorboard_scalars(folder):
    """{tag: [(step, value)]} from the event files under folder (TFRecord framing of Event protos)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        while data:
            (length,) = struct.unpack("<Q", data[:8])
            event = event_pb2.Event.FromString(data[12:12 + length])
            data = data[12 + length + 4:]
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_report_to(tiny_llama, data_dir, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    run_lora(capsys, *train_flags(tiny_llama, data_dir, folder, 4, "--steps-per-report", 2, "--report-to",
                                  "tensorboard"))
    scalars = tensorboard_scalars(folder / "runs" / "1" / "tensorboard")
    logged = lora.read_metrics(folder / "runs" / "1" / "metrics.jsonl")
    assert scalars["train_loss"] == [(r["iteration"], pytest.approx(r["train_loss"])) for r in logged if "train_loss" in r]
    assert [step for step, _ in scalars["val_loss"]] == [1]

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UserError, match=r"--report-to wandb: the wandb package is not installed \(pip install wandb\)"):
        run_lora(capsys, *train_flags(tiny_llama, data_dir, folder, 4, "--report-to", "wandb"))
