"""Data-parallel training on MLX's distributed engine: two ranks on this machine over the ring backend,
started by mlx.launch, against one process with the same global batch."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, sql_texts, write_pairs, write_unpaired

LAUNCH = shutil.which("mlx.launch")
pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch (MLX's launcher) is not installed")
LORA = str(ROOT / "lora.py")


def free_ports(n=2):
    """The first of n consecutive free local ports: the ring backend listens on one a rank."""
    while True:
        first = random.randint(20000, 60000)
        try:
            sockets = [socket.create_server(("127.0.0.1", first + i)) for i in range(n)]
        except OSError:
            continue
        for s in sockets:
            s.close()
        return first


def launch(ranks, *flags, timeout=300):
    """lora.py under mlx.launch on `ranks` local ranks (ring backend); the finished process."""
    command = [LAUNCH, "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_ports(ranks)), "--",
               sys.executable, LORA, *map(str, flags)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def single(*flags, timeout=300):
    return subprocess.run([sys.executable, LORA, *map(str, flags)], capture_output=True, text=True, timeout=timeout)


def metrics(folder):
    return [json.loads(line) for line in (folder / "runs" / "1" / "metrics.jsonl").read_text().splitlines()]


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "tensorboard" not in p.parts)


def assert_same_training(one, two, learning_rate):
    """Losses, adapters and the files written: the same from one process and from two ranks. The adapters
    within a twentieth of a step: Adam divides by the gradient's root mean square, so that the float rounding
    of sums taken in another order moves a weight whose gradient is near zero by up to a fraction of the
    learning rate."""
    for key in ("train_loss", "val_loss"):
        x, y = ([r[key] for r in metrics(folder) if key in r] for folder in (one, two))
        assert len(x) == len(y) and np.allclose(x, y, atol=1e-5), (key, x, y)
    a, b = (mx.load(str(folder / "adapters.safetensors")) for folder in (one, two))
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.abs(np.array(a[k], np.float32) - np.array(b[k], np.float32)).max() < learning_rate / 20, k
    assert files(one) == files(two)  # rank 1 wrote nothing of its own


@pytest.fixture
def completions(tmp_path):
    """Prompt and completion examples (for --mask-prompt)."""
    folder = tmp_path / "completions"
    folder.mkdir()
    for split, n, seed in [("train", 64, 1), ("valid", 16, 2)]:
        (folder / f"{split}.jsonl").write_text("".join(
            json.dumps(dict(zip(("prompt", "completion"), t.split("A: ", 1)))) + "\n" for t in sql_texts(n, seed)))
    return folder


@pytest.fixture(scope="module")
def quantized_llama(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "model"
    done = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--hf-path", str(tiny_llama), "--mlx-path",
                           str(path), "-q", "--q-group-size", "32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return path


RECIPES = {
    "validation-clipping-schedule": ["--val-batches", 2, "--eval-on-start", "--steps-per-eval", 2, "--max-grad-norm",
                                     0.05,
                                     "--lr-schedule", "cosine", "--warmup", 1, "--optimizer", "adamw",
                                     "--weight-decay", 0.01],
    "pack-sort-accumulate": ["--pack", "--sort-by-length", "--grad-accumulation-steps", 2],
    # 4 updates of 4 batches go through the 64 examples: the frozen layers are computed once
    "frozen-layers-cached": ["--grad-accumulation-steps", 4, "--eval-on-start", "--steps-per-eval", 2,
                             "--val-batches", -1],
    "dora": ["--fine-tune-type", "dora"],
    # the embedding's adapter's gradient a whole [vocabulary, rank]; the tokenizer saved once, by rank 0
    "embedding-and-output-layer": ["--lora-targets", "embed_tokens", "lm_head", "q_proj", "--learning-rate", 1e-3],
    "full": ["--fine-tune-type", "full", "--lora-layers", 1, "--learning-rate", 1e-3],
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_two_ranks_train_as_one_process(recipe, tiny_llama, data_dir, tmp_path):
    flags = ["--model", tiny_llama, "--data", data_dir, "--train", "--iters", 4, "--batch-size", 4,
             "--lora-layers", 2, "--lora-rank", 4, "--learning-rate", 1e-2, "--save-every", 2,
             "--steps-per-report", 1, "--val-batches", 0, *RECIPES[recipe]]
    one = single(*flags, "--adapter-file", tmp_path / "one" / "adapters.safetensors")
    assert one.returncode == 0, one.stderr
    two = launch(2, *flags, "--adapter-file", tmp_path / "two" / "adapters.safetensors")
    assert two.returncode == 0 and "Traceback" not in two.stderr, two.stdout + two.stderr
    assert_same_training(tmp_path / "one", tmp_path / "two", 1e-3 if recipe == "full" else 1e-2)
    # rank 0 alone prints: each report once, with the tokens of both ranks
    reports = [line for line in two.stdout.splitlines() if ": Train loss" in line]
    assert len(reports) == len([line for line in one.stdout.splitlines() if ": Train loss" in line])
    assert "2 processes" in two.stdout
    if recipe == "frozen-layers-cached":
        assert two.stdout.count("Computing the frozen layers 0-1 once") == 1


@pytest.mark.parametrize("train_mode", ["dpo", "orpo", "kto", "simpo", "cpo"])
def test_two_ranks_train_preferences_as_one_process(train_mode, tiny_llama, tmp_path):
    """The reference pass and the frozen-layer pass shared out, validation sharded: as one process. KTO's KL
    estimate is the whole batch's, over the ranks, also in validation's last batch, of which one rank has
    none (9 examples)."""
    if train_mode == "kto":
        data = write_unpaired(tmp_path / "kto", (("train", 8, 1), ("valid", 5, 2)))  # 16, an epoch in 4 steps
        valid = data / "valid.jsonl"
        valid.write_text("".join(valid.read_text().splitlines(keepends=True)[:9]))
    else:
        data = write_pairs(tmp_path / "pairs", (("train", 16, 1), ("valid", 6, 2)))
    flags = ["--model", tiny_llama, "--data", data, "--train", "--train-mode", train_mode, "--iters", 4,
             "--batch-size", 4, "--lora-layers", 2, "--lora-rank", 4, "--learning-rate", 1e-2,
             "--steps-per-report", 1, "--eval-on-start", "--steps-per-eval", 2, "--val-batches", -1]
    if train_mode in ("kto", "cpo"):  # whose loss reads the whole batch: packed and accumulated too
        flags += ["--pack", "--grad-accumulation-steps", 2]
    one = single(*flags, "--adapter-file", tmp_path / "one" / "adapters.safetensors")
    assert one.returncode == 0, one.stderr
    two = launch(2, *flags, "--adapter-file", tmp_path / "two" / "adapters.safetensors")
    assert two.returncode == 0 and "Traceback" not in two.stderr, two.stdout + two.stderr
    assert_same_training(tmp_path / "one", tmp_path / "two", 1e-2)
    assert "Computing the frozen layers 0-1 once" in two.stdout
    # (accuracies compare rewards that start at 0: noise; a KTO batch of one label has no margin)
    for key in ("kl", "val_kl") if train_mode == "kto" else ("rewards/margins", "val_rewards/chosen"):
        x, y = ([r[key] for r in metrics(folder) if key in r] for folder in (tmp_path / "one", tmp_path / "two"))
        assert len(x) == (3 if key.startswith("val_") else 4) and np.allclose(x, y, atol=1e-4), (key, x, y)


def test_two_ranks_train_grpo_as_one_process(tiny_llama, tmp_path):
    """Each rank generates its share of the groups, the completions one process generates (a prompt's seed is
    its place in the batch); the rewards, advantages and metrics are the whole batch's; with the KL term's
    reference pass, two updates a generation, and validation's batch shared out: as one process."""
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def low_ids(completion_ids, **kwargs):\n"
                       "    return [sum(i < 150 for i in ids) / len(ids) for ids in completion_ids]\n")
    data = tmp_path / "prompts"
    data.mkdir()
    for split, n in (("train", 8), ("valid", 4)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": t.split("A: ")[0] + "A:"}) + "\n"
                                                     for t in sql_texts(n)))
    flags = ["--model", tiny_llama, "--data", data, "--train", "--train-mode", "grpo", "--reward-functions",
             f"{rewards}:low_ids", "--num-generations", 2, "--batch-size", 8, "--max-completion-length", 6,
             "--max-seq-length", 64, "--beta", 0.05, "--num-iterations", 2, "--scale-rewards", "batch", "--iters", 4,
             "--lora-layers", 2, "--lora-rank", 4, "--learning-rate", 1e-2, "--steps-per-report", 1,
             "--eval-on-start", "--steps-per-eval", 2, "--val-batches", -1]
    one = single(*flags, "--adapter-file", tmp_path / "one" / "adapters.safetensors")
    assert one.returncode == 0, one.stderr
    two = launch(2, *flags, "--adapter-file", tmp_path / "two" / "adapters.safetensors")
    assert two.returncode == 0 and "Traceback" not in two.stderr, two.stdout + two.stderr
    assert_same_training(tmp_path / "one", tmp_path / "two", 1e-2)
    for key in ("reward", "kl", "completions/mean_length", "val_reward"):
        x, y = ([r[key] for r in metrics(folder) if key in r] for folder in (tmp_path / "one", tmp_path / "two"))
        assert len(x) == (3 if key.startswith("val_") else 4) and np.allclose(x, y, atol=1e-4), (key, x, y)


def test_two_ranks_of_a_quantized_model_with_masked_prompts(quantized_llama, completions, tmp_path):
    flags = ["--model", quantized_llama, "--data", completions, "--train", "--iters", 4, "--batch-size", 4,
             "--lora-layers", 2, "--lora-rank", 4, "--learning-rate", 1e-2, "--mask-prompt", "--val-batches", 1,
             "--eval-on-start", "--steps-per-eval", 2]
    one = single(*flags, "--adapter-file", tmp_path / "one" / "adapters.safetensors")
    assert one.returncode == 0, one.stderr
    two = launch(2, *flags, "--adapter-file", tmp_path / "two" / "adapters.safetensors")
    assert two.returncode == 0, two.stdout + two.stderr
    assert_same_training(tmp_path / "one", tmp_path / "two", 1e-2)


def test_resume_of_a_distributed_run(tiny_llama, data_dir, tmp_path):
    """A distributed run resumed from its checkpoint, on two ranks or on one process, ends where the
    uninterrupted run ends."""
    flags = ["--model", tiny_llama, "--data", data_dir, "--train", "--iters", 6, "--batch-size", 4,
             "--lora-layers", 2, "--lora-rank", 4, "--learning-rate", 1e-2, "--save-every", 3, "--val-batches", 0]
    whole = launch(2, *flags, "--adapter-file", tmp_path / "whole" / "adapters.safetensors")
    assert whole.returncode == 0, whole.stderr
    checkpoint = tmp_path / "whole" / "runs" / "1" / "step-0000003"
    expected = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    for name, run in (("two", launch), ("one", lambda _, *f: single(*f))):
        resumed = run(2, *flags, "--resume", checkpoint, "--adapter-file", tmp_path / name / "adapters.safetensors")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        got = mx.load(str(tmp_path / name / "adapters.safetensors"))
        for k in expected:
            assert np.abs(np.array(got[k]) - np.array(expected[k])).max() < 1e-2 / 20, (name, k)


def test_batch_size_must_divide_by_the_ranks(tiny_llama, data_dir, tmp_path):
    done = launch(2, "--model", tiny_llama, "--data", data_dir, "--train", "--iters", 2, "--batch-size", 3,
                  "--adapter-file", tmp_path / "a.safetensors", timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("lora.py: error:")]
    assert errors and "--batch-size 3" in errors[0] and "2 processes" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def rank_process(rank):
    """The PID of the lora.py process of this rank (MLX_RANK in its environment)."""
    for proc in Path("/proc").iterdir():
        try:
            if (LORA in (proc / "cmdline").read_bytes().decode(errors="replace")
                    and f"MLX_RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0")):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def test_a_killed_rank_ends_the_run_with_an_error(tiny_llama, data_dir, tmp_path):
    """Rank 1 killed mid-training: rank 0 stops with one line, not a hang, and its last checkpoint loads."""
    out = tmp_path / "out"
    command = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_ports()), "--", sys.executable,
               LORA, "--model", str(tiny_llama), "--data", str(data_dir), "--train", "--iters", "100000",
               "--batch-size", "4", "--lora-layers", "2", "--save-every", "5", "--val-batches", "0",
               "--adapter-file", str(out / "adapters.safetensors")]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as launched:
        deadline = time.time() + 120
        while not list(out.glob("runs/1/step-*")) and time.time() < deadline:
            time.sleep(0.2)
        assert list(out.glob("runs/1/step-*")), "no checkpoint within two minutes"
        os.kill(rank_process(1), signal.SIGKILL)
        try:
            stdout, stderr = launched.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            launched.kill()
            os.kill(rank_process(0), signal.SIGKILL)
            pytest.fail("rank 0 did not stop within 90 s of rank 1's end")
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("lora.py: error:")]
    assert len(errors) == 1 and ("lost a process" in errors[0] or "another process" in errors[0]), stderr
    checkpoint = sorted(out.glob("runs/1/step-*"))[-1]
    assert mx.load(str(checkpoint / "adapters.safetensors"))
    assert mx.load(str(out / "adapters.safetensors"))


STOPPED_WHILE = """
import sys, time
sys.path.insert(0, sys.argv[1])
import utils
def main():
    utils.stop_on_sigterm("prog", "stopped", seconds=2)
    print("ready", flush=True)
    if sys.argv[2] == "in C":  # a loop of C code that holds Python's lock, as MLX waiting on a peer that is gone
        sum(range(10**12))
    time.sleep(60)
utils.run_main("prog", main)
"""


@pytest.mark.parametrize("where", ["in C", "in Python"])
def test_sigterm_ends_a_rank_wherever_it_waits(where):
    """SIGTERM (mlx.launch's, when another rank ends) to a rank held in C code, where the signal's handler
    cannot run: within seconds one line says why and the process ends. In Python: the handler's line alone."""
    with subprocess.Popen([sys.executable, "-c", STOPPED_WHILE, str(ROOT), where], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout.readline() == "ready\n"
        time.sleep(1)
        process.send_signal(signal.SIGTERM)
        start = time.time()
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("the process did not end within 30 s of SIGTERM")
    assert time.time() - start < 10
    assert stderr.splitlines() == ["prog: error: stopped"], stderr
    assert process.returncode == (-signal.SIGKILL if where == "in C" else 1)


def test_a_rank_that_cannot_connect_is_an_error_in_bounded_time(tiny_llama, data_dir, tmp_path):
    """Rank 0 of two whose peer never starts: one line naming the wait, within LORA_CONNECT_TIMEOUT."""
    port = free_ports()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    env = dict(os.environ, MLX_RANK="0", MLX_HOSTFILE=str(hostfile), LORA_CONNECT_TIMEOUT="5")
    start = time.time()
    done = subprocess.run([sys.executable, LORA, "--model", str(tiny_llama), "--data", str(data_dir), "--train",
                           "--adapter-file", str(tmp_path / "a.safetensors")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert time.time() - start < 60
    assert done.returncode != 0 and done.stderr.startswith("lora.py: error:"), done.stderr
    assert "LORA_CONNECT_TIMEOUT" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_ctrl_c_stops_every_rank_at_the_same_step(tiny_llama, data_dir, tmp_path):
    """SIGINT to one rank alone (the others go on): every rank stops at the same step, rank 0 saves a
    checkpoint there, and resuming from it on two ranks goes on."""
    out = tmp_path / "out"
    flags = ["--model", str(tiny_llama), "--data", str(data_dir), "--train", "--batch-size", "4",
             "--lora-layers", "2", "--save-every", "1000", "--val-batches", "0",
             "--adapter-file", str(out / "adapters.safetensors")]
    command = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_ports()), "--", sys.executable,
               LORA, *flags, "--iters", "100000", "--steps-per-report", "1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as launched:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "runs" / "1" / "metrics.jsonl").exists():
            time.sleep(0.2)
        time.sleep(2)  # some steps in
        os.kill(rank_process(1), signal.SIGINT)
        try:
            stdout, stderr = launched.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            launched.kill()
            pytest.fail("the ranks did not stop within 90 s of Ctrl-C")
    assert "Traceback" not in stderr, stderr
    checkpoints = list(out.glob("runs/1/step-*"))
    assert len(checkpoints) == 1 and "Interrupted at iteration" in stdout, stdout + stderr
    stopped = json.loads((checkpoints[0] / "trainer_state.json").read_text())["iteration"]
    resumed = launch(2, *flags, "--iters", stopped + 2, "--resume", checkpoints[0])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads(sorted(out.glob("runs/2/step-*"))[-1].joinpath("trainer_state.json").read_text())[
        "iteration"] == stopped + 2


def test_a_bad_connect_timeout_is_one_line(tiny_llama, data_dir, tmp_path):
    env = dict(os.environ, MLX_RANK="0", MLX_HOSTFILE=str(tmp_path / "hosts.json"), LORA_CONNECT_TIMEOUT="soon")
    done = subprocess.run([sys.executable, LORA, "--model", str(tiny_llama), "--data", str(data_dir), "--train",
                           "--adapter-file", str(tmp_path / "a.safetensors")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "lora.py: error: LORA_CONNECT_TIMEOUT=soon: expected a number of seconds above 0"], done.stderr
    assert not (tmp_path / "runs").exists()
