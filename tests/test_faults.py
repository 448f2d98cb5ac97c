"""Faults, with the real scripts run as subprocesses: SIGKILL at random moments, a full disk, symlinks planted
in the output folder, a second run on the same folder, earlier runs' checkpoints and leftovers of killed runs.

What they hold lora.py (and convert.py, fuse.py) to:
- each `lora.py --train` run puts its checkpoints, metrics.jsonl and loss.png in a folder of its own,
  OUT/runs/<N>/ (the next free N), the adapters at --adapter-file with adapter_config.json beside them;
- every file is written under a unique temporary name (`.NAME.tmp-<pid>-<random>`) and renamed into place,
  never through a path that already exists;
- temporary leftovers of dead processes are removed by the next run, those of live ones are not;
- a run holds a lock on its output folder: a second one exits at once with one line on stderr;
- a write error is one line on stderr naming the path and the cause, with nothing left behind."""
import contextlib
import errno
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import mlx.core as mx
import pytest
from conftest import ALL_TARGETS, ROOT, random_adapter, sql_texts, write_jsonl

# The tiny model's adapters with --lora-layers 2 (of 4) on the default targets, and Adam's state for them.
ADAPTER_KEYS = {f"model.layers.{layer}.self_attn.{proj}.lora_{ab}"
                for layer in (2, 3) for proj in ("q_proj", "v_proj") for ab in "ab"}
OPTIMIZER_KEYS = {"step", "learning_rate"} | {f"{key}.{moment}" for key in ADAPTER_KEYS for moment in "mv"}
CHECKPOINT_FILES = ["adapter_config.json", "adapters.safetensors", "optimizer.safetensors", "trainer_state.json"]
COMMON = ["--lora-layers", 2, "--batch-size", 4, "--eval-on-start", "--steps-per-eval", 1000, "--val-batches", 1]

START_TIMEOUT = 180  # seconds for a run to reach its first iteration (the first one compiles MLX's kernels)
RUN_TIMEOUT = 300  # for a short run to finish
PNG_START, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


# ---------------------------------------------------------------- running the scripts

def lora_cmd(model, data, out, iters, *more):
    """lora.py --train on the tiny model, the adapters saved to OUT/adapters.safetensors."""
    return [sys.executable, ROOT / "lora.py", "--model", model, "--data", data, "--train", *COMMON,
            "--iters", iters, "--adapter-file", out / "adapters.safetensors", *more]


def run(args, cwd, timeout=RUN_TIMEOUT):
    """Run to the end (a hang fails the test through TimeoutExpired); the CompletedProcess, text captured."""
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


class Running:
    """A script running in the background, its stdout and stderr (merged) read by a thread, so that the test
    can wait for a line with a deadline instead of blocking on the pipe."""

    def __init__(self, args, cwd):
        # SIGHUP as a terminal leaves it: under nohup (the tests run in the background) it would stay ignored,
        # as the scripts leave a signal ignored when they start
        self.proc = subprocess.Popen([str(a) for a in args], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
        self.lines, self.ended = [], threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
        self.ended.set()

    def output(self):
        return "".join(self.lines)

    def iterating(self):
        """Whether it has printed an "Iter" line: it is training (or saving)."""
        return any(line.startswith("Iter ") for line in self.lines)

    def wait_for_line(self, prefix, after=0, timeout=START_TIMEOUT):
        """The index of the first line from `after` on that starts with `prefix`; fails if the process ends
        first or the line does not come in time."""
        deadline = time.monotonic() + timeout
        while True:
            ended = self.ended.is_set()  # read before the lines: a line read in between is still seen
            for i in range(after, len(self.lines)):
                if self.lines[i].startswith(prefix):
                    return i
            if ended:
                pytest.fail(f"ended (status {self.proc.wait()}) before a line {prefix!r}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no line {prefix!r} within {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def finish(self, timeout=60):
        """Its exit status, once it has ended (TimeoutExpired if not within `timeout`)."""
        status = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return status


@pytest.fixture
def background():
    """start(args, cwd) -> Running; whatever is still running at the end of the test is killed."""
    started = []

    def start(args, cwd):
        started.append(Running(args, cwd))
        return started[-1]

    yield start
    for running in started:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait(timeout=30)


def assert_one_line_error(result, script, *needles):
    """Exit non-zero with ONE line on stderr, "<script>: error: ...", holding each needle; no traceback."""
    assert result.returncode != 0, f"{script} succeeded:\n{result.stdout[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr[-3000:]}"
    assert lines[0].startswith(f"{script}: error: "), lines[0]
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


# ---------------------------------------------------------------- what the output folder holds

def is_temporary(path, folder):
    """A temporary name (or inside one): the old fixed ones (.adapters.tmp.safetensors) and the new unique
    ones (.adapters.safetensors.tmp-<pid>-<random>) both hold ".tmp"."""
    return any(".tmp" in part for part in path.relative_to(folder).parts)


def temporary_leftovers(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


def damage(path):
    """Why this file is not whole (truncated, unreadable, unexpected content), or None."""
    try:
        if path.suffix == ".safetensors":
            weights = mx.load(str(path))
            mx.eval(list(weights.values()))
            expected = OPTIMIZER_KEYS if path.name == "optimizer.safetensors" else ADAPTER_KEYS
            if set(weights) != expected:
                return f"keys {sorted(set(weights) ^ expected)} differ from the expected ones"
        elif path.name == "adapter_config.json":
            if json.loads(path.read_text())["lora_parameters"]["keys"] != ["self_attn.q_proj", "self_attn.v_proj"]:
                return "not the run's adapter config"
        elif path.name == "trainer_state.json":
            if path.parent.name != f"step-{json.loads(path.read_text())['iteration']:07d}":
                return "its iteration is not its folder's"
        elif path.name == "metrics.jsonl":
            text = path.read_text()
            if text and not text.endswith("\n"):
                return "ends in a partial line"
            for line in text.splitlines():
                json.loads(line)
        elif path.suffix == ".png":
            data = path.read_bytes()
            if not (data.startswith(PNG_START) and data.endswith(PNG_END)):
                return f"not a whole PNG ({len(data)} bytes)"
    except Exception as e:  # mx.load raises RuntimeError, json ValueError or KeyError, reads OSError
        return f"{type(e).__name__}: {e}"
    return None


def damaged_files(folder):
    """{file: why} for the files under `folder`, temporary ones aside, that are not whole."""
    found = {}
    for path in sorted(folder.rglob("*")) if folder.exists() else []:
        if path.is_file() and not is_temporary(path, folder):
            why = damage(path)
            if why:
                found[str(path.relative_to(folder))] = why
    return found


def checkpoints(out):
    """OUT/runs/<N>/step-* folders (temporary ones aside), oldest step first, by run for the same step."""
    found = [p for p in out.glob("runs/*/step-*") if p.is_dir() and not is_temporary(p, out)]
    return sorted(found, key=lambda p: (int(p.name.split("-")[1]), int(p.parent.name)
                                        if p.parent.name.isdigit() else 0))


def newest_complete_checkpoint(out):
    """The newest checkpoint with all its files whole, or None."""
    complete = [p for p in checkpoints(out) if sorted(f.name for f in p.iterdir()) == CHECKPOINT_FILES
                and not any(damage(p / f) for f in CHECKPOINT_FILES)]
    return complete[-1] if complete else None


def has_checkpoint(out):
    """Whether a checkpoint was saved, asked while a run saves and prunes them (a folder may vanish as listed)."""
    try:
        return any(out.glob("runs/*/step-*/trainer_state.json"))
    except FileNotFoundError:  # a checkpoint folder was pruned while listed: there was one
        return True


def trainer_state(checkpoint):
    return json.loads((checkpoint / "trainer_state.json").read_text())


def hashes(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train_records(run_folder):
    return [r for r in map(json.loads, (run_folder / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]


# ---------------------------------------------------------------- 1. SIGKILL at random moments

KILLS = 22
KILL_ITERS = 100_000  # never reached while killing: each run is killed, not finished


def test_kill_during_saves(tiny_llama, data_dir, tmp_path, background):
    """Runs saving at every iteration, each killed at a random moment, each resumed from the newest complete
    checkpoint: after every kill, everything under OUT is whole; a last resume finishes and cleans up."""
    rng = random.Random(20240601)  # seeded: the same moments (relative to the runs' progress) every time
    out = tmp_path / "out"
    kills = kills_in_training = 0
    while kills < KILLS:
        resume = newest_complete_checkpoint(out)
        running = background(lora_cmd(tiny_llama, data_dir, out, KILL_ITERS, "--save-every", 1,
                                       *(["--resume", resume] if resume else [])), tmp_path)
        if rng.random() < 0.15:  # now and then during start-up: the lock, cleaning up, --resume's reads
            time.sleep(rng.uniform(0.5, 4.0))
        else:  # mostly while it trains, saving adapters and a checkpoint (and pruning one) every iteration
            running.wait_for_line("Iter ")
            time.sleep(rng.uniform(0.02, 1.0))
        assert running.proc.poll() is None, f"the run ended before it was killed:\n{running.output()[-3000:]}"
        # a kill counts as landing in training if the run was iterating and a checkpoint existed to break
        in_training = running.iterating() and has_checkpoint(out)
        running.proc.send_signal(signal.SIGKILL)
        running.finish(timeout=30)
        kills += 1
        kills_in_training += in_training
        damaged = damaged_files(out)
        assert not damaged, f"after kill {kills} ({'training' if in_training else 'start-up'}): {damaged}"
    assert kills_in_training >= 15, f"only {kills_in_training} of {kills} kills landed while training"

    # one last resume runs to its end, a few iterations on (--iters counts from the start of training)
    resume = newest_complete_checkpoint(out)
    assert resume is not None, f"no complete checkpoint after {kills} kills: {sorted(map(str, out.rglob('*')))}"
    last = trainer_state(resume)["iteration"] + 5
    result = run(lora_cmd(tiny_llama, data_dir, out, last, "--save-every", 1, "--resume", resume), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert damage(out / "adapters.safetensors") is None and damage(out / "adapter_config.json") is None
    assert trainer_state(newest_complete_checkpoint(out))["iteration"] == last
    assert not damaged_files(out), damaged_files(out)
    # the killed runs' temporary files, in OUT and in each run's folder, are gone
    assert not temporary_leftovers(out), temporary_leftovers(out)
    print(f"{kills} kills, {kills_in_training} while training; resumed to iteration {last}")


# ---------------------------------------------------------------- 2. a full disk

@contextlib.contextmanager
def tmpfs(folder, size_kb):
    """A tmpfs of size_kb mounted at `folder` (skipped where mount is not allowed), unmounted at the end."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs (root needed): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def fill(folder, leave_kb):
    """Fill the file system of `folder` with a file, then free `leave_kb` of it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave_kb * 1024))


def test_disk_full(tiny_llama, data_dir, tmp_path):
    """A run whose saves fit, then one in the same folder whose saves run out of space: one line naming the
    path and the cause, nothing temporary left, the earlier adapters and checkpoints still whole."""
    with tmpfs(tmp_path / "disk", 1024) as disk:
        out = disk / "out"
        first = run(lora_cmd(tiny_llama, data_dir, out, 4, "--save-every", 2, "--keep-checkpoints", 0), tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        saved = hashes(out / "runs" / "1")
        assert {str(p.relative_to(out)) for p in checkpoints(out)} == {"runs/1/step-0000002", "runs/1/step-0000004"}

        fill(disk, leave_kb=48)  # room to start and log, not for the checkpoints of every iteration
        second = run(lora_cmd(tiny_llama, data_dir, out, 20, "--save-every", 1, "--keep-checkpoints", 0,
                              "--steps-per-report", 1), tmp_path)
        assert_one_line_error(second, "lora.py", disk, NO_SPACE)
        assert not temporary_leftovers(disk), temporary_leftovers(disk)
        assert not damaged_files(out), damaged_files(out)
        assert damage(out / "adapters.safetensors") is None  # the last adapters saved, whichever run saved them
        assert hashes(out / "runs" / "1") == saved  # the first run's checkpoints, metrics and plot untouched


def test_disk_full_convert(tiny_llama, tmp_path):
    with tmpfs(tmp_path / "disk", 256) as disk:  # the tiny model is 750 KB in float32
        result = run([sys.executable, ROOT / "convert.py", "--hf-path", tiny_llama, "--mlx-path", disk / "model"],
                     tmp_path)
        assert_one_line_error(result, "convert.py", disk, NO_SPACE)
        assert not temporary_leftovers(disk), temporary_leftovers(disk)
        # nothing half-written: no weights, no config (a lock file may stay)
        written = [str(p.relative_to(disk)) for p in disk.rglob("*") if p.is_file() and p.suffix != ".lock"]
        assert not written, written


def test_disk_full_fuse(tiny_llama, tmp_path):
    adapters = tmp_path / "adapters" / "adapters.safetensors"
    adapters.parent.mkdir()
    random_adapter(tiny_llama, adapters)
    with tmpfs(tmp_path / "disk", 256) as disk:
        result = run([sys.executable, ROOT / "fuse.py", "--model", tiny_llama, "--adapter-file", adapters,
                      "--save-path", disk / "fused"], tmp_path)
        assert_one_line_error(result, "fuse.py", disk, NO_SPACE)
        assert not temporary_leftovers(disk), temporary_leftovers(disk)
        written = [str(p.relative_to(disk)) for p in disk.rglob("*") if p.is_file() and p.suffix != ".lock"]
        assert not written, written


# ---------------------------------------------------------------- 3. planted symlinks

def test_planted_symlinks(tiny_llama, data_dir, tmp_path):
    """Symlinks to files outside OUT at the old fixed temporary names and at the destinations themselves: the
    files outside never change, and the destinations become regular files."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    planted = [".adapters.tmp.safetensors", ".adapters.safetensors.tmp", ".adapter_config.tmp.json",
               ".adapter_config.json.tmp", "adapter_config.json", "adapters.safetensors"]
    victims = {}
    for name in planted:
        victim = outside / f"victim-of-{name.strip('.')}"
        victim.write_bytes(f"precious content of {victim.name}\n".encode())
        (out / name).symlink_to(victim)
        victims[victim] = victim.read_bytes()

    result = run(lora_cmd(tiny_llama, data_dir, out, 2, "--save-every", 1), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    changed = [victim.name for victim, content in victims.items() if victim.read_bytes() != content]
    assert not changed, f"written through planted symlinks: {changed}"
    assert sorted(p.name for p in outside.iterdir()) == sorted(v.name for v in victims)
    for name in ("adapters.safetensors", "adapter_config.json"):
        assert not (out / name).is_symlink() and (out / name).is_file(), f"{name} is still a symlink"
        assert damage(out / name) is None, damage(out / name)


def test_planted_symlink_at_the_lock(tiny_llama, data_dir, tmp_path):
    """The lock file may be written (a run can note its pid there): a symlink planted there never changes the
    file it points to. The run may refuse the folder (one line) or go on."""
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (out / ".lora.lock").symlink_to(victim)
    result = run(lora_cmd(tiny_llama, data_dir, out, 2, "--save-every", 1), tmp_path)
    assert victim.read_bytes() == b"precious\n", "written through the symlink planted at the lock"
    if result.returncode:
        assert_one_line_error(result, "lora.py", out)
    else:
        assert damage(out / "adapters.safetensors") is None


# ---------------------------------------------------------------- 4. a second run on the same folder

def test_second_concurrent_run_refuses(tiny_llama, data_dir, tmp_path, background):
    out = tmp_path / "out"
    first = background(lora_cmd(tiny_llama, data_dir, out, 100_000, "--save-every", 1000,
                                "--steps-per-report", 5), tmp_path)
    first.wait_for_line("Iter ")

    # the same adapter file, and another adapter file in the same folder: the folder is what is locked
    for adapter_file in ("adapters.safetensors", "other.safetensors"):
        flags = lora_cmd(tiny_llama, data_dir, out, 5)
        flags[flags.index("--adapter-file") + 1] = out / adapter_file
        start = time.monotonic()
        second = run(flags, tmp_path, timeout=60)
        took = time.monotonic() - start
        assert_one_line_error(second, "lora.py", out)
        assert took < 30, f"the second run took {took:.1f} s to refuse"
        assert first.proc.poll() is None, f"the first run ended:\n{first.output()[-3000:]}"
    assert not (out / "other.safetensors").exists()
    # a refused run makes no run folder of its own (a run's number is taken under the lock)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["1"]

    # the first run goes on training, and stops at Ctrl-C as always: a checkpoint, status 130
    first.wait_for_line("Iter ", after=len(first.lines), timeout=60)
    first.proc.send_signal(signal.SIGINT)
    assert first.finish(timeout=60) == 130, first.output()[-3000:]
    assert "Traceback" not in first.output()
    checkpoint = re.search(r"--resume (\S+)", first.output())
    assert checkpoint, first.output()[-3000:]
    checkpoint = out / "runs" / "1" / os.path.basename(checkpoint[1])
    assert sorted(p.name for p in checkpoint.iterdir()) == CHECKPOINT_FILES
    assert not damaged_files(out), damaged_files(out)
    assert damage(out / "adapters.safetensors") is None


# ---------------------------------------------------------------- 5. runs in the same folder

def test_second_run_in_same_folder_keeps_earlier_checkpoints(tiny_llama, data_dir, tmp_path):
    out = tmp_path / "out"
    flags_a = ["--save-every", 2, "--keep-checkpoints", 2, "--learning-rate", 1e-4, "--seed", 1,
               "--steps-per-report", 1]
    flags_b = ["--save-every", 2, "--keep-checkpoints", 1, "--learning-rate", 3e-4, "--seed", 2,
               "--steps-per-report", 1]
    a = run(lora_cmd(tiny_llama, data_dir, out, 6, *flags_a), tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    assert [str(p.relative_to(out)) for p in checkpoints(out)] == ["runs/1/step-0000004", "runs/1/step-0000006"]
    run_a = hashes(out / "runs" / "1")
    assert {"metrics.jsonl", "loss.png"} <= set(run_a)

    b = run(lora_cmd(tiny_llama, data_dir, out, 4, *flags_b), tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    # B pruned its own checkpoints only: A's are all there, unchanged, with A's metrics and plot
    assert hashes(out / "runs" / "1") == run_a
    assert sorted(str(p.relative_to(out)) for p in checkpoints(out)) == [
        "runs/1/step-0000004", "runs/1/step-0000006", "runs/2/step-0000004"]
    b_checkpoint = out / "runs" / "2" / "step-0000004"
    state = trainer_state(b_checkpoint)
    assert state["iteration"] == 4 and state["args"]["learning_rate"] == 3e-4 and state["seed"] == 2
    assert [r["iteration"] for r in train_records(out / "runs" / "2")] == [1, 2, 3, 4]
    assert hashes(b_checkpoint)["adapters.safetensors"] == hashes(out)["adapters.safetensors"]  # B saved last
    run_b = hashes(out / "runs" / "2")

    # --resume continues B, as a run of its own (runs/3), its metrics starting with B's up to the checkpoint
    resumed = run(lora_cmd(tiny_llama, data_dir, out, 8, *flags_b, "--resume", b_checkpoint), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Iter 5: Train loss" in resumed.stdout and "Iter 4: Train loss" not in resumed.stdout
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["1", "2", "3"]
    records = train_records(out / "runs" / "3")
    assert [r["iteration"] for r in records] == list(range(1, 9))
    assert records[:4] == train_records(out / "runs" / "2")
    assert all(r["learning_rate"] == pytest.approx(3e-4, rel=1e-6) for r in records)  # B's, not A's 1e-4
    assert [p.name for p in (out / "runs" / "3").glob("step-*")] == ["step-0000008"]
    assert trainer_state(out / "runs" / "3" / "step-0000008")["iteration"] == 8
    assert hashes(out / "runs" / "1") == run_a and hashes(out / "runs" / "2") == run_b
    assert not damaged_files(out), damaged_files(out)


# ---------------------------------------------------------------- 6. leftovers of killed runs

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


def test_leftovers_of_a_killed_run_are_removed(tiny_llama, data_dir, tmp_path):
    out = tmp_path / "out"
    dead = next(pid for pid in range(999_999, 1_100_000) if not alive(pid))
    # what a run killed while saving leaves: its private temporary folders, with a file half-written in them,
    # in OUT and in its run folder
    dead_leftovers = [out / f".adapters.safetensors.tmp-{dead}-abc", out / f".adapter_config.json.tmp-{dead}-zz",
                      out / "runs" / "1" / f".step-0000002.tmp-{dead}-k3"]
    for leftover in dead_leftovers:
        leftover.mkdir(parents=True)
        (leftover / "adapters.safetensors").write_bytes(b"half a file")
    # a live process's temporary folder (this one's) and the user's own file are not the run's to remove
    live = out / f".adapters.safetensors.tmp-{os.getpid()}-x"
    live.mkdir()
    (live / "adapters.safetensors").write_bytes(b"being written")
    (out / "notes.txt").write_text("my notes\n")

    result = run(lora_cmd(tiny_llama, data_dir, out, 2, "--save-every", 1), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [str(p.relative_to(out)) for p in dead_leftovers if os.path.lexists(p)] == []
    assert (live / "adapters.safetensors").read_bytes() == b"being written"
    assert (out / "notes.txt").read_text() == "my notes\n"
    assert temporary_leftovers(out) == [live.name]
    assert damage(out / "adapters.safetensors") is None


# ---------------------------------------------------------------- 7. a run that diverges

# on every linear layer of the last two, at this learning rate the tiny model's losses are NaN after one update
DIVERGING = ["--lora-targets", *ALL_TARGETS, "--learning-rate", 1e20]


def test_divergence_keeps_the_earlier_adapters(tiny_llama, data_dir, tmp_path):
    """A good run, then two in the same folder that diverge at their first update: the second stops at the
    NaN validation loss, the third (no validation) at the loss of the adapters it was about to save; neither
    writes anything over the first's adapters and checkpoints."""
    out = tmp_path / "out"
    good = run(lora_cmd(tiny_llama, data_dir, out, 2, "--save-every", 2), tmp_path)
    assert good.returncode == 0, good.stderr[-3000:]
    saved = hashes(out)
    kept = f"this run saved nothing; {out / 'adapters.safetensors'} is as it was"
    for flags, what in ((["--eval-on-start", "--steps-per-eval", 1], "the validation loss is nan"),
                        (["--val-batches", 0], "the adapters give a loss of nan on the first training batch")):
        result = run(lora_cmd(tiny_llama, data_dir, out, 4, "--save-every", 1, *DIVERGING, *flags), tmp_path)
        after = hashes(out)
        assert {name: after.get(name) for name in saved} == saved
        assert not [name for name in after if name not in saved and "step-" in name]  # no checkpoint either
        assert_one_line_error(result, "lora.py", f"iteration 1: {what}; training stopped ({kept})",
                              "--learning-rate")


def test_divergence_names_adapters_that_give_a_finite_loss(tiny_llama, data_dir, tmp_path):
    """The learning rate warms up to 1e18 over 20 iterations, saving at every one: the first saves are good,
    then an update breaks the model. What the error names as saved last is what --adapter-file holds, and it
    gives a finite loss."""
    out = tmp_path / "out"
    result = run(lora_cmd(tiny_llama, data_dir, out, 20, "--save-every", 1, "--warmup", 20,
                          *DIVERGING[:-1], 1e18), tmp_path)
    line = assert_one_line_error(result, "lora.py", "training stopped")
    checkpoint = re.search(r"\S+step-\d+", line)[0].rstrip(",")
    assert (out / "adapters.safetensors").read_bytes() == (out / checkpoint / "adapters.safetensors").read_bytes()
    tested = run([sys.executable, ROOT / "lora.py", "--model", tiny_llama, "--data", data_dir, "--test",
                  "--adapter-file", out / "adapters.safetensors"], tmp_path)
    assert tested.returncode == 0 and re.search(r"Test loss \d+\.\d+", tested.stdout), tested.stderr[-3000:]


# ---------------------------------------------------------------- 8. stop signals: SIGTERM, SIGHUP, Ctrl-C

STOPS = 20  # SIGTERMs at random moments, and a SIGHUP after them


def the_error_line(running, signum):
    """The one line a run stopped by a signal ends with, "lora.py: error: stopped ...", on its merged output;
    no traceback, the exit status 128 + the signal's number."""
    try:  # (generous: on a loaded 2-core machine a run's steps and saves slow down several times)
        status, output = running.finish(timeout=120), running.output()
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 120 s after the signal:\n{running.output()[-3000:]}")
    assert status == 128 + signum, f"status {status}:\n{output[-3000:]}"
    errors = [line for line in output.splitlines() if line.startswith("lora.py: error: ")]
    assert "Traceback" not in output and len(errors) == 1 and output.rstrip().endswith(errors[0]), output[-3000:]
    assert errors[0].startswith("lora.py: error: stopped "), errors[0]
    return errors[0]


def test_stop_signals_at_random_moments(tiny_llama, data_dir, tmp_path, background):
    """SIGTERM at random moments (and a SIGHUP last) to runs that each resume from the checkpoint the one before
    named: each ends with one line; one stopped while training saves the step it was at (none is lost) and names
    it for --resume; one stopped before its first step names none and saves nothing; nothing is left half-written,
    temporary or locked. A last resume runs to its end."""
    rng = random.Random(20250611)
    out = tmp_path / "out"
    flags = ["--save-every", 3, "--eval-on-start", "--steps-per-eval", 4, "--val-batches", 4, "--steps-per-report", 1]
    resume, in_training = None, 0
    for stop in range(STOPS + 1):
        signum = signal.SIGHUP if stop == STOPS else signal.SIGTERM
        running = background(lora_cmd(tiny_llama, data_dir, out, KILL_ITERS, *flags,
                                      *(["--resume", resume] if resume else [])), tmp_path)
        if rng.random() < 0.2:  # loading, tokenizing, the frozen-layer pass, compiling the first step
            running.wait_for_line("Loading pretrained model")
            time.sleep(rng.uniform(0.0, 1.5))
        else:  # training, validating (every 4 iterations), saving (every 3)
            running.wait_for_line("Iter ")
            time.sleep(rng.uniform(0.02, 1.0))
        assert running.proc.poll() is None, f"the run ended before the signal:\n{running.output()[-3000:]}"
        running.proc.send_signal(signum)
        line = the_error_line(running, signum)
        assert line.startswith(f"lora.py: error: stopped by {'SIGHUP' if stop == STOPS else 'SIGTERM'}"), line
        trained = [int(i) for i in re.findall(r"^Iter (\d+): Train loss", running.output(), re.MULTILINE)]
        named = re.search(r"--resume (\S+)$", line)
        if trained:
            in_training += 1
            assert named, line
            checkpoint = out / "runs" / named[1].split("/runs/")[1]
            assert sorted(p.name for p in checkpoint.iterdir()) == CHECKPOINT_FILES
            assert trainer_state(checkpoint)["iteration"] == max(trained), line  # the step it was at
            resume = checkpoint
        else:
            assert not named and newest_complete_checkpoint(out) == resume, line
        assert not os.path.lexists(out / ".lora.lock"), f"stop {stop + 1}: the lock is left"
        assert not temporary_leftovers(out), f"stop {stop + 1}: {temporary_leftovers(out)}"
        assert not damaged_files(out), f"stop {stop + 1}: {damaged_files(out)}"
    assert in_training >= 14, f"only {in_training} of {STOPS + 1} signals landed while training"

    last = trainer_state(resume)["iteration"] + 3
    result = run(lora_cmd(tiny_llama, data_dir, out, last, *flags, "--resume", resume), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert trainer_state(newest_complete_checkpoint(out))["iteration"] == last
    print(f"{STOPS + 1} stops, {in_training} while training; resumed to iteration {last}")


def test_ctrl_c_during_validation_stops_within_a_second(tiny_llama, tmp_path, background):
    """A validation set that takes seconds: Ctrl-C during it stops the run within a second, saving the
    iteration it validated."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", sql_texts(64, 1))
    write_jsonl(data / "valid.jsonl", sql_texts(5000, 2))
    out = tmp_path / "out"
    running = background(lora_cmd(tiny_llama, data, out, KILL_ITERS, "--val-batches", -1, "--steps-per-report", 1,
                                  "--no-cache-frozen-layers"), tmp_path)
    running.wait_for_line("Iter 1: Train loss")
    time.sleep(0.3)
    sent = time.monotonic()
    running.proc.send_signal(signal.SIGINT)
    running.wait_for_line("Interrupted at iteration 1.", timeout=60)
    took = time.monotonic() - sent
    line = the_error_line(running, signal.SIGINT)
    assert took < 1.0, f"Ctrl-C took {took:.1f} s to stop the validation"
    assert "Val loss" not in running.output()  # it was cut short
    assert line.endswith(f"--resume {out / 'runs' / '1' / 'step-0000001'}"), line
    assert sorted(p.name for p in (out / "runs" / "1" / "step-0000001").iterdir()) == CHECKPOINT_FILES
    assert not os.path.lexists(out / ".lora.lock") and not temporary_leftovers(out)


def test_a_second_ctrl_c_stops_at_once(tiny_llama, tmp_path, background):
    """Steps of about a second: the first Ctrl-C stops the run after the step under way, to save it; a second,
    sent once the first is acknowledged, stops it at once, without saving, and says so."""
    data = tmp_path / "data"
    data.mkdir()
    texts = sql_texts(64 * 40, 1)
    write_jsonl(data / "train.jsonl", [" ".join(texts[i:i + 40]) for i in range(0, len(texts), 40)])  # 512 tokens
    out = tmp_path / "out"
    running = background(lora_cmd(tiny_llama, data, out, KILL_ITERS, "--batch-size", 8, "--max-seq-length", 512,
                                  "--val-batches", 0, "--steps-per-report", 1, "--no-cache-frozen-layers"), tmp_path)
    running.wait_for_line("Iter 2: Train loss")
    running.proc.send_signal(signal.SIGINT)
    running.wait_for_line("Ctrl-C (SIGINT): stopping after the step under way", timeout=60)
    running.proc.send_signal(signal.SIGINT)
    assert the_error_line(running, signal.SIGINT) == ("lora.py: error: stopped at once by a second Ctrl-C (SIGINT): "
                                                      "this run saved nothing")
    assert not (out / "adapters.safetensors").exists() and not checkpoints(out)
    assert not os.path.lexists(out / ".lora.lock") and not temporary_leftovers(out)
