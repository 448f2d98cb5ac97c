"""What the scripts share, in this order: the process's set-up, errors and flags, reading files, loading models
(Hugging Face folders, hub repos, GGUF files), writing files safely, saving models, adapters, generation."""
import argparse
import contextlib
import copy
import glob
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import subprocess
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

import models


# Process set-up


def blas_libraries() -> dict:
    """{name: path} of the fast BLAS libraries here that can stand in, preloaded, for the reference BLAS that
    MLX's Linux wheel links: Intel's MKL from its pip wheel (requirements.txt); OpenBLAS, Debian's or else pip's
    (requirements.txt, through pip_openblas)."""
    import site

    found = {}
    mkl = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so.*"))
                 + glob.glob(os.path.join(site.getuserbase(), "lib", "libmkl_rt.so.*")))
    if mkl:
        found["mkl"] = mkl[0]
    openblas = sorted(glob.glob("/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3")) or [pip_openblas()]
    if openblas[0]:
        found["openblas"] = openblas[0]
    return found


# pip's OpenBLAS (the scipy-openblas32 wheel) prefixes its functions' names with scipy_, under which MLX and the
# LAPACK it links (its SVD, QR, ...) do not find them: it is preloaded through a library that gives every one of
# them its own name, each a jump to the prefixed one, built once with the system's compiler (x86-64, as pip
# installs the wheel there alone).
def pip_openblas():
    """The path of a library that gives scipy-openblas32's functions their unprefixed names, built into the
    user's cache the first time; None without that wheel, or where it cannot be built."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "lib"
    library = folder / "libscipy_openblas.so"
    compiler, nm = shutil.which(os.environ.get("CC", "cc")), shutil.which("nm")
    if not library.exists() or compiler is None or nm is None:
        return None
    stat = library.stat()
    key = hashlib.sha1(f"{library} {stat.st_size} {stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-mlx"

    def digest(path):
        return hashlib.sha1(path.read_bytes()).hexdigest()[:16]

    try:
        # named by its own digest too: a damaged copy (preloaded, it ended the process with a bus error) is built
        # again
        for built in cache.glob(f"openblas-{key}-*.so"):
            if built.stem.rsplit("-", 1)[1] == digest(built):
                return str(built)
            built.unlink(missing_ok=True)
        symbols = subprocess.run([nm, "-D", "--defined-only", str(library)], check=True, capture_output=True,
                                 text=True).stdout.splitlines()
        names = [fields[2].removeprefix("scipy_") for fields in map(str.split, symbols)
                 if len(fields) == 3 and fields[1] == "T" and fields[2].startswith("scipy_")]
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            source, output = Path(tmp) / "names.s", Path(tmp) / "names.so"
            source.write_text("".join(f".globl {name}\n.type {name}, @function\n{name}: jmp scipy_{name}@PLT\n"
                                      for name in names))
            subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(output), f"-L{folder}",
                            "-lscipy_openblas", f"-Wl,-rpath,{folder}"], check=True, capture_output=True)
            built = cache / f"openblas-{key}-{digest(output)}.so"
            os.replace(output, built)  # whole or not at all, should another process build it too
    except (OSError, subprocess.CalledProcessError):
        return None
    return str(built)


def cpu_info() -> tuple:
    """(vendor, flags) of the processor, from /proc/cpuinfo."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields.get("vendor_id", ""), set(fields.get("flags", "").split())


# OpenBLAS's kernels for each x86 feature level, the best first. A build that does not know the processor
# picks older ones (Debian 12's took a Sapphire Rapids for a Prescott: SSE3, a sixth of the speed): where it
# picked one from before AVX2 on a processor that has it, it is told the right one.
OPENBLAS_CORES = (("avx512_bf16", "Cooperlake"), ("avx512bw", "SkylakeX"), ("avx2", "Haswell"))


OPENBLAS_AVX2_CORES = ("haswell", "zen", "skylakex", "cooperlake", "sapphirerapids")


def blas_settings(name: str, library: str) -> dict:
    """The environment a BLAS needs here: OpenBLAS the kernels of the processor's feature level where it would
    pick older ones itself (unless OPENBLAS_CORETYPE is set)."""
    if name != "openblas" or os.environ.get("OPENBLAS_CORETYPE"):
        return {}
    import ctypes

    get_corename = ctypes.CDLL(library).openblas_get_corename
    get_corename.restype = ctypes.c_char_p
    _, flags = cpu_info()
    best = next((core for flag, core in OPENBLAS_CORES if flag in flags), None)
    return {"OPENBLAS_CORETYPE": best} if best and get_corename().decode().lower() not in OPENBLAS_AVX2_CORES else {}


def preferred_blas(found: dict):
    """The BLAS to preload of those found (LORA_BLAS=mkl|openblas|none chooses): on AMD processors OpenBLAS,
    whose AVX-512 kernels run there at twice MKL's speed (MKL keeps its own for Intel's); elsewhere MKL, as
    fast quiet and faster with other processes running (benchmarks/blas.py)."""
    choice = os.environ.get("LORA_BLAS")
    if choice and choice not in found and choice != "none":
        print(f"[WARNING] LORA_BLAS={choice}: no such BLAS here (found: {', '.join(found) or 'none'}).", flush=True)
    if choice:
        return choice if choice in found else None
    order = ("openblas", "mkl") if cpu_info()[0] == "AuthenticAMD" else ("mkl", "openblas")
    return next((name for name in order if name in found), None)


def cpu_environment():
    """On the Linux CPU, the environment to re-execute in, with two changes that each make training several
    times faster: a fast BLAS preloaded (preferred_blas), since MLX's wheel links a reference BLAS that runs
    fp32 products at a few GFLOP/s, against hundreds; and glibc's malloc told to keep freed memory, since it
    otherwise maps and unmaps every large array, and page faults then cost more than the arithmetic. None
    where there is nothing to change (it is in force already). Without a fast BLAS, one warning with the fix."""
    if sys.platform != "linux" or mx.default_device() != mx.cpu or "LORA_CPU_ENVIRONMENT" in os.environ:
        return None
    found = blas_libraries()
    name = preferred_blas(found)
    env = dict(os.environ, LORA_CPU_ENVIRONMENT=name or "bundled", MALLOC_MMAP_MAX_="0",
               MALLOC_TRIM_THRESHOLD_=str(1 << 40))
    # The BLAS gets the cores that other processes leave idle: a thread on a core that another process keeps
    # busy is preempted, and the BLAS's other threads wait for it (beside one busy process, two threads on two
    # cores trained at under half the speed of one thread); ranks of a distributed run share them
    if not any(k in os.environ for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")):
        threads = str(max(1, idle_cores() // local_ranks()))
        env.update(OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if name is None:
        if not found:
            print("[WARNING] No fast BLAS found: MLX's own runs the CPU's products at a few GFLOP/s, and training "
                  "is tens of times slower. pip install mkl scipy-openblas32 (or apt-get install "
                  "libopenblas0-pthread).", flush=True)
        return env
    return dict(env, LD_PRELOAD=" ".join(filter(None, [found[name], os.environ.get("LD_PRELOAD")])),
                **blas_settings(name, found[name]))


def idle_cores(seconds=0.2) -> int:
    """The cores this process may use that other processes leave idle, over a moment (/proc/stat); at least 1."""
    def sample():  # the jiffies of all cores: in total, and idle or waiting for I/O
        jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(jiffies), jiffies[3] + jiffies[4]

    cores = len(os.sched_getaffinity(0))
    try:
        (total, idle), _, (total_after, idle_after) = sample(), time.sleep(seconds), sample()
    except (OSError, ValueError, IndexError):
        return cores
    idle_share = (idle_after - idle) / max(total_after - total, 1)
    return max(1, min(cores, round(idle_share * (os.cpu_count() or cores))))


def local_ranks() -> int:
    """How many ranks of a distributed run this machine runs (mlx.launch's ring hostfile, MPI's local size); 1
    outside one."""
    if os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "").isdigit():
        return int(os.environ["OMPI_COMM_WORLD_LOCAL_SIZE"])
    rank, hostfile = os.environ.get("MLX_RANK", ""), os.environ.get("MLX_HOSTFILE")
    try:
        hosts = [host[0].rsplit(":", 1)[0] for host in json.loads(Path(hostfile).read_text())]
        return max(1, hosts.count(hosts[int(rank)]))
    except (TypeError, OSError, ValueError, IndexError, KeyError, AttributeError):
        return 1


# A process that waits for `seconds`, says why on stderr and ends this one (SIGKILL: not a stop signal, which would
# add a line of its own), unless it is ended first
CONNECT_WATCH = ("import os, signal, sys, time; time.sleep(float(sys.argv[2])); sys.stderr.write(sys.argv[3]); "
                 "os.kill(int(sys.argv[1]), signal.SIGKILL)")
LAUNCHER_VARIABLES = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def distributed_group(prog: str):
    """MLX's group of the processes a launcher (mlx.launch, mpirun) started, or a group of one. MLX's backends
    wait for ranks that never connect: past LORA_CONNECT_TIMEOUT seconds (default 120) this process ends with
    one line instead."""
    if not any(k in os.environ for k in LAUNCHER_VARIABLES):
        return mx.distributed.init()
    timeout = os.environ.get("LORA_CONNECT_TIMEOUT", "120")
    try:
        seconds = float(timeout)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:  # NaN too
        raise UserError(f"LORA_CONNECT_TIMEOUT={timeout}: expected a number of seconds above 0")
    seconds = min(seconds, 1e9)  # as good as forever (inf): the watch's time.sleep takes no more
    check_ring_settings()
    message = (f"{prog}: error: the processes of the distributed run did not all connect within {timeout} s "
               f"(LORA_CONNECT_TIMEOUT); is every rank started, and can each reach the others' hosts and ports?\n")
    # MLX holds Python's lock while it waits: the watch is a process of its own
    watch = subprocess.Popen([sys.executable, "-c", CONNECT_WATCH, str(os.getpid()), str(seconds), message])
    try:
        return mx.distributed.init()
    finally:
        watch.kill()
        watch.wait()


def check_ring_settings():
    """MLX_RANK and MLX_HOSTFILE (ring's: a list of hosts, each a list of "ip:port" addresses, or one), which MLX
    reads with a traceback, a crash or a wait without end where they are wrong."""
    rank = os.environ.get("MLX_RANK")
    if rank is not None and not re.fullmatch(r"[0-9]{1,9}", rank):
        raise UserError(f"MLX_RANK={rank}: expected this process's rank, a whole number from 0")
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile is None:
        return
    try:
        with naming_flag("MLX_HOSTFILE"):
            text = read_text(hostfile)
        hosts = json.loads(text)
    except ValueError as e:
        raise UserError(f"MLX_HOSTFILE={hostfile}: not valid JSON ({first_line(e)})") from None
    addresses = [host if isinstance(host, list) else [host] for host in hosts] if isinstance(hosts, list) else []
    if not addresses or not all(addresses) or not all(
            isinstance(a, str) and re.fullmatch(r".+:\d+", a) for host in addresses for a in host):
        raise UserError(f'MLX_HOSTFILE={hostfile}: expected a list of hosts, each a list of "ip:port" addresses '
                        f'(mlx.launch and mlx.distributed_config write it)')
    if rank is not None and int(rank) >= len(addresses):
        raise UserError(f"MLX_RANK={rank}: MLX_HOSTFILE {hostfile} lists {len(addresses)} hosts, ranks 0 to "
                        f"{len(addresses) - 1}")


# A process that waits until this one is sent SIGTERM (Python writes the number of each signal it catches to
# the pipe this reads: signal.set_wakeup_fd), then gives it `seconds` to end, and else says why on stderr and
# kills it. The end of the pipe (this one ended) ends it.
STOP_WATCH = ("import os, select, signal, sys\n"
              "fd, pid, seconds, line = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]\n"
              "while (got := os.read(fd, 1)) and got[0] != signal.SIGTERM: pass\n"
              "while got and select.select([fd], [], [], seconds)[0]: got = os.read(fd, 1)\n"
              "if got: sys.stderr.write(line); os.kill(pid, signal.SIGKILL)\n")


def stop_on_sigterm(prog: str, message: str, seconds: float = 30.0):
    """On SIGTERM, raise UserError(message). MLX can hold Python's lock while it waits on a process that has
    gone, and the handler then never runs: if this process has not ended `seconds` after the signal, a
    watching process prints the error line and kills it."""
    def stopped(*_):
        raise UserError(message)

    signal.signal(signal.SIGTERM, stopped)
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    subprocess.Popen([sys.executable, "-c", STOP_WATCH, str(read), str(os.getpid()), str(seconds),
                      f"{prog}: error: {message}\n"], pass_fds=(read,))
    os.close(read)


def set_up_process(before_reexec=lambda: None):
    """What a script sets before it does anything: its environment, and on the Linux CPU a re-execution in
    cpu_environment() where that has changes to make (calling before_reexec() first)."""
    # transformers is here for its tokenizers alone, which need no PyTorch. Where PyTorch is installed,
    # transformers imports it anyway, which on a GPU server took longer than reading a 7B's weights
    # (benchmarks/README.md): hidden, as none of the scripts uses it, transformers goes without. Its advice
    # that PyTorch is missing is then noise.
    sys.modules.setdefault("torch", None)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # MLX's CUDA backend frees what a graph of work read only once it has run, with several graphs in flight:
    # QLoRA's steps, which dequantize each weight for its product (models.dequantizes), then held most layers'
    # float weights at once. Smaller graphs keep its peak below LoRA's at the same speed (benchmarks/README.md,
    # "QLoRA against LoRA"). MLX reads it when it first runs on the GPU.
    if mx.cuda.is_available():
        os.environ.setdefault("MLX_MAX_MB_PER_BUFFER", "200")
    env = cpu_environment()
    if env is not None:
        before_reexec()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


# Errors and flags


class UserError(Exception):
    """Bad input from the user: the scripts print it as one line, never a traceback."""


@contextlib.contextmanager
def naming_flag(flag: str):
    """Errors of bad input raised inside (UserError, ValueError), as a UserError that starts with the flag (and
    value) they concern: the code below the scripts describes a problem, the scripts name the flag."""
    try:
        yield
    except (UserError, ValueError) as e:
        raise UserError(f"{flag}: {e}") from None


# The signals that ask a script to stop: Ctrl-C, kill's (a timeout's, a cluster's preemption), a closed terminal
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
held_stops = None  # the stop signals noted while a block holds them (hold_stops), else None


class Stopped(KeyboardInterrupt):
    """A stop signal arrived: the script ends with the line str(self) (none if empty) and exit status
    128 + signum. A KeyboardInterrupt, so that no `except Exception` takes it for an error of the work."""

    def __init__(self, signum, message=None):
        super().__init__(f"stopped by {STOP_SIGNALS[signum]}" if message is None else message)
        self.signum = signum


def on_stop_signal(signum, frame):
    if held_stops is not None and not held_stops:
        held_stops.append(signum)
        return
    raise Stopped(signum, None if held_stops is None else f"stopped at once by a second {STOP_SIGNALS[signum]}")


def handle_stop_signals():
    """Make each stop signal raise Stopped wherever the script is, so that it ends within moments with one
    line, its temporary files and locks removed on the way out (staged, exclusive), unless a block holds
    them (hold_stops). A signal ignored when the script started stays ignored (nohup's SIGHUP)."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, on_stop_signal)


def hold_stops() -> list:
    """Until release_stops(), the first stop signal is noted in the list this gives instead of raised, for the
    caller to stop where it can (the training loop: after the step under way, saving it); a second is raised at
    once."""
    global held_stops
    held_stops = []
    return held_stops


def release_stops():
    global held_stops
    held_stops = None


@contextlib.contextmanager
def holding_stops():
    """hold_stops() for a block, whose signal noted is raised on the way out; within a block that holds them
    already, nothing changes (the outer one acts on a signal)."""
    if held_stops is not None:
        yield
        return
    noted = hold_stops()
    try:
        yield
    finally:
        release_stops()
    if noted:
        raise Stopped(noted[0])


@contextlib.contextmanager
def stops_at_once():
    """Inside, even the first stop signal is raised at once, within a block that holds them: for work that is
    better dropped than waited for (validation)."""
    global held_stops
    outer, held_stops = held_stops, None
    try:
        yield
    finally:
        held_stops = outer


def run_main(prog: str, main):
    """Run a script's main(): bad input, or an error of the file system that no check foresaw, is one line on
    stderr naming what is at fault, never a traceback. A stop signal (STOP_SIGNALS) ends it where it is with one
    line, and exit status 128 + the signal's number (130 for Ctrl-C)."""
    handle_stop_signals()
    try:
        check_temporary_folder()
        main()
    except UserError as e:
        sys.exit(f"{prog}: error: {' '.join(str(e).splitlines())}")
    except OSError as e:
        sys.exit(f"{prog}: error: {e.filename or 'a file'}: {e.strerror or e}")
    except KeyboardInterrupt as e:  # Stopped, or Ctrl-C where no handler of ours was installed
        if str(e):
            print(f"{prog}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # at once, the files written and the locks released on the way here: tearing the interpreter down takes
        # a second or more (transformers' modules), and waits for threads still reading (load)
        os._exit(128 + getattr(e, "signum", signal.SIGINT))


def check_temporary_folder():
    """MLX compiles its CPU kernels into TMPDIR, and a TMPDIR it cannot write stops it mid-run with an error of
    its own: checked before any work instead."""
    folder = os.environ.get("TMPDIR")
    if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
        raise UserError(f"TMPDIR={folder}: not a folder this process can write (MLX writes its compiled kernels "
                        f"there); create it, or unset TMPDIR")


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: an error in the flags is one line (the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def flag_type(kind, check, requirement):
    """An argparse type: the flag's value as `kind`, refused unless finite and check(value) holds."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not check(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, not {text!r}")
        return value

    return parse


POSITIVE_INT = flag_type(int, lambda v: v >= 1, "an integer of at least 1")

NON_NEGATIVE_INT = flag_type(int, lambda v: v >= 0, "an integer of at least 0")

POSITIVE_INT_OR_ALL = flag_type(int, lambda v: v >= 1 or v == -1, "an integer of at least 1, or -1 for all")

SEED = flag_type(int, lambda v: 0 <= v < 2**32, "an integer from 0 to 4294967295")

POSITIVE = flag_type(float, lambda v: v > 0, "a number above 0")

NON_NEGATIVE = flag_type(float, lambda v: v >= 0, "a number of at least 0")

DROPOUT = flag_type(float, lambda v: 0 <= v < 1, "a probability from 0 to below 1")

TOP_P = flag_type(float, lambda v: 0 < v <= 1, "a probability above 0, up to 1")


def expanded_path(text: str) -> str:
    """The argparse type of the flags that name a file or folder: ~ expanded, which a shell leaves in quotes and
    after "=" (--model=~/m), and YAML everywhere."""
    return os.path.expanduser(text)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@contextlib.contextmanager
def bounded(seconds: float, memory: int):
    """Run the block with limits on its time and on the memory its Python objects take at once (bytes, as
    tracemalloc counts them): past either, TimeoutError or MemoryError is raised inside it. For code that may run
    away (a chat template, which its sandbox lets loop and grow without end). A timer signal checks, every 10 ms,
    so the limits hold in the main thread alone; elsewhere the block runs unbounded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import tracemalloc

    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, deadline = tracemalloc.get_traced_memory()[0], time.monotonic() + seconds

    def check(*_):
        if time.monotonic() > deadline:
            raise TimeoutError(f"ran for over {seconds:g} s")
        if tracemalloc.get_traced_memory()[1] - base > memory:
            raise MemoryError(f"took over {memory / 2**20:g} MB of memory")

    previous = signal.signal(signal.SIGALRM, check)
    signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if not tracing:
            tracemalloc.stop()


# Reading files: each error names the file


def read_text(path) -> str:
    """The UTF-8 text of a file the user gave, or an error naming it."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_json(path) -> dict:
    """The JSON object in a file, or an error naming the file."""
    try:
        value = json.loads(read_text(path))
    except ValueError as e:  # JSONDecodeError, or an integer past Python's 4300 digits
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, not {type(value).__name__}")
    return value


def read_jsonl(path) -> list:
    """(line number, JSON value) of each line of a .jsonl file that is not blank; an error names the line."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    values = []
    for number, line in enumerate(data.splitlines(), 1):
        try:
            line = line.decode("utf-8")
            if line.strip():
                values.append((number, json.loads(line)))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{number}: not UTF-8 text (byte {e.start + 1} of the line)") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        except ValueError as e:  # an integer past Python's 4300 digits
            raise UserError(f"{path}:{number}: not valid JSON ({first_line(e)})") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
    return values


def read_arrays(path, return_metadata=False):
    """mx.load of a .safetensors, .npz or .gguf file; a damaged one is an error naming it."""
    path = Path(path)
    if path.suffix == ".gguf":
        check_gguf(path)
    try:
        return mx.load(str(path), return_metadata=return_metadata)
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"{path}: cannot be read ({first_line(e)})") from None


# Numbers: weights that are not finite, and values beyond a type's range


def first_not_finite(arrays: dict):
    """The name of the first of these arrays (name: array) of a float type that holds NaN, or Inf but for an
    array of one value: a bound, which may be infinite (Gemma 4's encoders clip to ±Inf), or None.
    One sum per array, evaluated together: a NaN or Inf makes the sum NaN or Inf, and a sum needs no array
    the size of its input (mx.isfinite would make one); a sum that is not finite is then confirmed value by
    value, as finite values can overflow it."""
    def broken(value):
        return (mx.isnan(value) if value.size == 1 else ~mx.isfinite(value)).any().item()

    floats = [name for name, value in arrays.items() if mx.issubdtype(value.dtype, mx.floating)]
    sums = mx.stack([arrays[name].sum().astype(mx.float32) for name in floats]).tolist() if floats else []
    return next((name for name, total in zip(floats, sums) if not math.isfinite(total) and broken(arrays[name])),
                None)


def check_finite(arrays: dict, where):
    """An error naming `where` and the first of these arrays (name: array) that holds NaN or Inf."""
    bad = first_not_finite(arrays)
    if bad is not None:
        raise UserError(f"{where}: tensor {bad} holds {not_finite(arrays[bad])}")


def not_finite(value: mx.array) -> str:
    """What an array that is not finite holds."""
    return "NaN" if mx.isnan(value).any().item() else "Inf"


def type_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def narrowed(value: mx.array, dtype, where: str, advice: str = "") -> mx.array:
    """value as dtype, evaluated; an error naming `where` (and advice) if the result is not finite: values
    beyond dtype's range, or the value's own NaN or Inf. Written weights never hold an Inf a cast made."""
    result = value.astype(dtype)
    if first_not_finite({where: result}) is None:
        return result
    if first_not_finite({where: value}) is not None:
        raise UserError(f"{where} holds {not_finite(value)}")
    largest = mx.abs(value).max().item()
    raise UserError(f"{where} holds values up to {largest:.4g} in magnitude, beyond {type_name(dtype)}'s range "
                    f"(±{mx.finfo(dtype).max:.6g}){advice}")


# GGUF's value types: struct formats of the fixed-size ones (8 is a string, 9 an array)
GGUF_VALUES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def check_gguf(path: Path):
    """MLX's GGUF reader crashes the process on some damaged files (a valid magic over random bytes): check
    that the header, the metadata and the tensors' extents fit in the file first. (gguf's GGUFReader checks
    this too, but builds every metadata value, which takes seconds for a vocabulary.)"""
    import mmap
    import struct

    import gguf

    def fail(what):
        raise UserError(f"{path}: not a readable GGUF file ({what})")

    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""

    def read(fmt):
        nonlocal pos
        if pos + struct.calcsize(fmt) > len(data):
            fail("it ends inside its header: truncated?")
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values[0]

    def skip_value(kind):
        nonlocal pos
        if kind == 8:
            length = read("Q")  # (read moves pos: not pos += read(...))
            pos += length
        elif kind == 9:
            element, count = read("I"), read("Q")
            if element in GGUF_VALUES:
                pos += count * struct.calcsize(GGUF_VALUES[element])
            else:
                for _ in range(count):
                    skip_value(element)
        elif kind in GGUF_VALUES:
            read(GGUF_VALUES[kind])
        else:
            fail(f"metadata value of unknown type {kind}")
        if pos > len(data):
            fail("it ends inside its metadata: truncated?")

    if len(data) < 8 or data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] not in (2, 3):
        fail("no GGUF magic and version 2 or 3")
    pos = 8
    tensors, keys = read("Q"), read("Q")
    alignment = 32
    for _ in range(keys):
        key_length = read("Q")
        key = bytes(data[pos:pos + key_length])
        pos += key_length
        kind = read("I")
        if key == b"general.alignment" and kind == 4:
            alignment = struct.unpack_from("<I", data, pos)[0] or 32
        skip_value(kind)
    extents = []
    for _ in range(tensors):
        skip_value(8)  # the name
        dims = [read("Q") for _ in range(read("I"))]
        kind, offset = read("I"), read("Q")
        if kind not in gguf.GGML_QUANT_SIZES:
            fail(f"tensor of unknown type {kind}")
        block, size = gguf.GGML_QUANT_SIZES[kind]
        extents.append(offset + math.prod(dims) // block * size)
    start = -(-pos // alignment) * alignment
    if start + max(extents, default=0) > len(data):
        fail("its tensors extend past its end: truncated?")


# Loading models: Hugging Face folders, hub repos, GGUF files


def load(path_or_repo: str):
    """(model, tokenizer, config) from a Hugging Face folder, a hub repo id, or a llama-architecture GGUF file.
    The tokenizer loads in a thread while the weights are read: importing transformers takes seconds (where
    PyTorch is installed, transformers imports it), and MLX lets other threads run while it reads (read_in_threads)."""
    path = Path(path_or_repo)
    if is_gguf_file(path):  # the tokenizer is in its metadata
        config, weights, tokenizer = read_gguf(path)
        return build_model(config, weights, path_or_repo), tokenizer, config
    pool = ThreadPoolExecutor(1)
    try:
        tokenizer = pool.submit(read_tokenizer, checkpoint_folder(path_or_repo))
        config, weights, _ = read_checkpoint(path_or_repo, tokenizer=False, evaluated=True)
        model = build_model(config, weights, path_or_repo)
        return model, tokenizer.result(), config
    finally:
        pool.shutdown(wait=False)  # left by an error or a stop signal: not waiting for the tokenizer


def is_gguf_file(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def checkpoint_folder(path_or_repo: str, flag: str = "--model") -> Path:
    """The folder of a Hugging Face checkpoint: the path, or a hub repo's snapshot."""
    path = Path(path_or_repo)
    if not path.exists():
        if not is_repo_id(path_or_repo):
            raise UserError(f"{flag} {path_or_repo}: no such file or folder")
        path = hub_snapshot(path_or_repo)
    return path


def read_checkpoint(path_or_repo: str, flag: str = "--model", tokenizer=True, evaluated=False, names=None):
    """(config, weights, tokenizer) of a Hugging Face folder, a hub repo id, or a llama-architecture GGUF file,
    with the model's weight names (models.CheckpointNames.ours: Hugging Face's, but for the prefixes of families
    that put the decoder elsewhere). Weights from safetensors are read lazily, each when it is evaluated, or
    if `evaluated` at once (read_in_threads) in the compute dtype, those in `names` alone if given.
    tokenizer=False skips a folder's tokenizer (None); a GGUF file's comes with its metadata anyway."""
    path = Path(path_or_repo)
    if is_gguf_file(path):
        return read_gguf(path)
    path = checkpoint_folder(path_or_repo, flag)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json (expected a model folder in the Hugging Face layout)")
    config = read_json(path / "config.json")
    files = sorted(glob.glob(str(path / "*.safetensors")))
    shapes = {k: v.shape for f in files for k, v in read_arrays(f).items()}  # the headers alone
    check_config(config, path / "config.json", sum(math.prod(shape) for shape in shapes.values()) if files else None)
    if not files:
        raise UserError(f"{path}: no *.safetensors weights")
    checkpoint = models.checkpoint_names(config)
    rename = checkpoint.ours
    check_sizes(config, {rename(k): shape for k, shape in shapes.items()}, path / "config.json")
    dropped = models.FAMILIES[config["model_type"]].dropped  # weights the model does not have
    if dropped is not None or names is not None:  # from the headers alone
        wanted = names  # (ours: a stack of experts' array stands for each expert's)
        names = {rename(k) for f in files for k in read_arrays(f) if dropped is None or not dropped(config, k)}
        if wanted is not None:
            names = {k for k in names if any(n in wanted for n in checkpoint.fused(k) or
                                             [(checkpoint.expert_of(k) or (k,))[0]])}
    if evaluated:
        weights = read_in_threads(files, lambda arrays: in_compute_dtype(config, arrays), names, rename=rename)
    else:
        weights = {rename(k): v for f in files for k, v in read_arrays(f).items()
                   if dropped is None or not dropped(config, k)}
    try:
        weights = checkpoint.stacked(weights)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    if evaluated:  # a stack at a time, each expert's weights freed once in it
        for value in weights.values():
            mx.eval(value)
    return config, weights, read_tokenizer(path) if tokenizer else None


def read_in_threads(files, convert, names=None, threads=16, rename=lambda name: name):
    """The arrays (those in `names`, or all) of these safetensors files, named rename(name), each made
    convert(arrays) and evaluated, read by several threads at once: one thread reads and copies far below the
    memory's rate (on a GPU, most of the time loading took). Each thread makes the arrays it evaluates, as MLX's
    streams belong to the thread that made them; the arrays are split by their size, so that one file's are read
    in parallel too."""
    lazy = {f: read_arrays(f) for f in files}  # the headers alone
    sizes = sorted(((v.nbytes, f, k) for f, arrays in lazy.items() for k, v in arrays.items()
                    if names is None or rename(k) in names), reverse=True)
    parts = [[] for _ in range(max(1, min(threads, len(sizes))))]
    loads = [0] * len(parts)
    for size, f, k in sizes:  # each to the least loaded part
        i = loads.index(min(loads))
        parts[i].append((f, k))
        loads[i] += size

    def read(part):
        opened = {f: read_arrays(f) for f in {f for f, _ in part}}
        arrays = convert({rename(k): opened[f][k] for f, k in part})
        try:
            mx.eval(arrays)
        except (RuntimeError, ValueError, OSError) as e:
            raise UserError(f"{', '.join(sorted(opened))}: cannot be read ({first_line(e)})") from None
        # as converted: a weight beyond the range of the type the model computes in is as broken as a NaN
        bad = first_not_finite(arrays)
        if bad is not None:
            f, k = next((f, k) for f, k in part if rename(k) == bad)
            check_finite({k: opened[f][k]}, f)
            narrowed(opened[f][k], arrays[bad].dtype, f"{f}: tensor {k}",
                     ", the type the model computes in here (config.json's dtype)")
        return arrays

    pool = ThreadPoolExecutor(len(parts))
    try:
        return {k: v for arrays in pool.map(read, parts) for k, v in arrays.items()}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # left by an error or a stop signal: not waiting for the rest


def read_tokenizer(path: Path):
    """The tokenizer of a Hugging Face folder."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    # transformers reads config.json for the tokenizer too and warns of what its own model would make of it,
    # which is not the model models.py builds (check_config says what is wrong with it, in one line)
    logging.set_verbosity_error()

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).exists():  # their damage named here: transformers' errors do not name the file
            read_json(path / name)
    try:  # code shipped in a model folder (auto_map) is never run
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError or others for a missing or odd tokenizer
        if "trust_remote_code" in str(e):
            raise UserError(f"{path}: its tokenizer needs code from the model folder (auto_map in "
                            f"tokenizer_config.json or config.json), which is never run") from None
        raise UserError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {first_line(e)})") from None


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face repo id (owner/name) rather than a local path."""
    return (not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not name.endswith(".gguf"))


def hub_snapshot(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            repo, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]))
    except Exception as e:  # the hub client raises many kinds (offline, not found, gated, no token)
        raise UserError(f"cannot fetch {repo!r} from the Hugging Face hub ({type(e).__name__}: "
                        f"{first_line(e)}); pass a local folder or .gguf file") from None


def compute_dtype(config: dict):
    """float32 on the CPU, where MLX's bf16/fp16 matmuls are slow; the checkpoint's own dtype elsewhere."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float16"
    return getattr(mx, name, mx.float16)


def quantization_of(weights: dict, path: str, module):
    """Bits and group size of a layer stored quantized (weight, scales and biases), read off the shapes."""
    scales = weights.get(f"{path}.scales")
    if scales is None:
        return None
    if not isinstance(module, (nn.Linear, nn.Embedding, models.ExpertsLinear)):
        return None
    input_dims = module.weight.shape[-1]
    packed = weights[f"{path}.weight"].shape[-1]
    return {"group_size": input_dims // scales.shape[-1], "bits": packed * 32 // input_dims}


def model_skeleton(config: dict, weights: dict) -> models.Model:
    """The model config.json describes, holding the weights it keeps as they are (models.Model.keep). Its
    other parameters are not evaluated until loaded over: unevaluated, they give names and shapes for free.
    The config is one that check_config accepted."""
    args = models.ModelArgs.from_config(config)
    if "lm_head.weight" in weights:  # transformers 5 ties only an output layer that the checkpoint does not hold
        args.tie_word_embeddings = False
    model = models.make_model(args)
    model.keep(weights)
    return model


def check_config(config: dict, where, values=None):
    """An error naming `where` unless the config describes a model that models.py builds, with no size larger
    than the weights' count of values (`values`, where known)."""
    try:
        models.ModelArgs.from_config(config, values)
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None
    except KeyError as e:
        raise UserError(f"{where}: {e} missing") from None


def check_sizes(config: dict, shapes: dict, where):
    """An error naming `where` and the field unless the config (one check_config accepted) has no more layers or
    experts than the weights ({our name: shape}) hold, nor vocab_size or hidden_size beyond their embeddings:
    checked before the model is built, as a config of ten million layers would build for hours."""
    args = models.ModelArgs.from_config(config)
    layers = {int(m[1]) for name in shapes if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    experts = {int(m[1]) for name in shapes if (m := re.search(r"\.experts\.(\d+)\.", name))}
    rows, columns = shapes.get("model.embed_tokens.weight", (None, None))
    if "model.embed_tokens.scales" in shapes:  # quantized: its columns are packed values
        columns = None
    for field, value, found, what in [
            ("num_hidden_layers", args.num_hidden_layers, len(layers), "decoder layers"),
            ("num_local_experts", args.num_local_experts, len(experts) if experts else None, "experts a layer"),
            ("vocab_size", args.vocab_size, rows, "rows of model.embed_tokens.weight"),
            ("hidden_size", args.hidden_size, columns, "columns of model.embed_tokens.weight")]:
        if found is not None and value > found:
            raise UserError(f"{where}: {field} is {value}, but the weights have {found} {what}")


def build_model(config: dict, weights: dict, source="the model") -> models.Model:
    """A model from a Hugging Face config and Hugging Face-named weights (of `source`, named in errors);
    quantized layers stay quantized."""
    model = model_skeleton(config, weights)
    models.quantize(model, lambda path, module: quantization_of(weights, path, module))
    weights = {k: v for k, v in in_compute_dtype(config, weights).items() if "rotary_emb.inv_freq" not in k}
    # a one-element parameter in either shape: transformers writes xIELU's alpha_p as (1,), mlx-lm as ()
    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    weights.update({k: v.reshape(shapes[k]) for k, v in weights.items()
                    if v.size == 1 and k in shapes and v.shape != shapes[k] and math.prod(shapes[k]) == 1})
    # a short convolution's weight (LFM2's) in either layout: transformers' [channels, 1, taps], mlx-lm's [.., taps, 1]
    weights.update({k: v.swapaxes(1, 2) for k, v in weights.items()
                    if k in shapes and len(shapes[k]) == 3 and shapes[k][1] == 1 and v.shape == shapes[k][::2] + (1,)})
    try:
        model.load_weights(list(weights.items()))
    except ValueError as e:
        raise UserError(f"{source}: the weights do not fit its config: {e}") from None
    mx.eval(model.parameters())
    return model


def in_compute_dtype(config: dict, weights: dict) -> dict:
    # scales and biases of quantized layers too: dequantizing with fp16 scales on the CPU runs in emulated
    # fp16, slower than the matmul it feeds
    dtype = compute_dtype(config)
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def reload_weights(model: models.Model, path_or_repo: str, names):
    """Read the weights `names` of the checkpoint `model` was loaded from (load) into it again."""
    config, weights, _ = read_checkpoint(path_or_repo, tokenizer=False, evaluated=True, names=set(names))
    reloaded = in_compute_dtype(config, {k: weights[k] for k in names})
    model.update(tree_unflatten(list(reloaded.items())))
    mx.eval(reloaded)  # these alone: the others may wait on work that will not finish (a failed distributed step)


GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def gguf_config(meta: dict, weights: dict) -> dict:
    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        return value.item() if isinstance(value, mx.array) and value.size == 1 else value

    heads = get("attention.head_count")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or None),
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in weights,
        "hidden_act": "silu",
    }
    if get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    for name in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{name}_token_id" in meta:
            key = "pad_token_id" if name == "padding" else f"{name}_token_id"
            config[key] = meta[f"tokenizer.ggml.{name}_token_id"].item()
    return config


def read_gguf(path: Path):
    """(config, weights, tokenizer) of a GGUF file of the llama architecture, with Hugging Face's names;
    quantized tensors (Q4_0, Q4_1, Q8_0) stay quantized, as MLX's weight, scales and biases."""
    weights, meta = read_arrays(path, return_metadata=True)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (llama)")
    check_finite(weights, path)  # quantized tensors' scales and biases too
    config = gguf_config(meta, weights)
    check_config(config, path, sum(v.size for v in weights.values()))
    renamed = {}
    for name, value in weights.items():
        parts = name.split(".")
        if parts[0] == "blk":
            if len(parts) != 4 or not parts[1].isdigit() or parts[2] not in GGUF_NAMES:
                raise UserError(f"{path}: tensor {name} is not one of a llama model's")
            hf = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
        elif parts[0] in GGUF_NAMES and len(parts) == 2:
            hf = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
        else:
            continue  # rope_freqs and other llama.cpp extras
        # llama.cpp permutes q/k rows for its interleaved rope; undo it (rows of scales/biases too).
        if parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if parts[2] == "attn_q" else config["num_key_value_heads"]
            rows, rest = value.shape[0], value.shape[1:]
            if rows % (2 * heads):
                raise UserError(f"{path}: tensor {name} has {rows} rows, not a whole number of {heads} heads")
            value = value.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
        renamed[hf] = value
    check_sizes(config, {k: v.shape for k, v in renamed.items()}, path)
    config["dtype"] = "float16"
    try:
        tokenizer = gguf_tokenizer(meta)
    except Exception as e:  # the converter raises KeyError, ValueError or others on odd metadata
        raise UserError(f"{path}: cannot read its tokenizer ({type(e).__name__}: {first_line(e)})") from None
    return config, renamed, tokenizer


def gguf_tokenizer(meta: dict):
    """The tokenizer a GGUF file describes in its metadata. transformers' own GGUF reader needs torch, so
    this hands the metadata MLX read to transformers' converter directly."""
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                           convert_gguf_tokenizer)
    except ImportError:  # transformers 4
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    fields = {
        group: {name: value.tolist() if isinstance(value, mx.array) else value
                for key, name in renames.items() if (value := meta.get(f"tokenizer.{key}")) is not None}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, tokenizer_config = fields["tokenizer"], fields["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tokenizer)
    special = {f"{name}_token": tokenizer["tokens"][tokenizer[f"{name}_token_id"]]
               for name in ("bos", "eos", "unk", "pad") if f"{name}_token_id" in tokenizer}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special, **tokenizer_config)


# Writing files: whole or not at all, one writer at a time


def atomic_write(path, write):
    """write(f) to a new binary file that becomes `path` once complete and on disk, so that an interrupted or
    failed save leaves the old file as it was; written in a private folder (staged), never through a path
    that someone else could have made a link."""
    path = Path(path)
    with staged(path) as tmp:
        with open(tmp / path.name, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp / path.name, path)


def save_safetensors(path, arrays: dict, metadata: dict):
    """A new safetensors file, written through a file object: MLX's own file writes do not report errors
    (a full disk)."""
    with open(path, "xb") as f:
        mx.save_safetensors(f, arrays, metadata=metadata)


def write_json(path, value):
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=2).encode()))


# Temporary files and folders are named .NAME.tmp-PID-RANDOM: the process that made them can be told to be gone
TEMPORARY = re.compile(r"\..+\.tmp-(\d+)-[^.]+")
RANDOM_CHARACTERS = 8  # that mkdtemp adds to a prefix


def temporary_prefix(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}-"


@contextlib.contextmanager
def staged(out: Path):
    """A new folder beside `out` that only this process writes in (mkdtemp: unique, private, no link followed),
    removed whatever happens; an error of the file system while writing is one UserError naming `out`."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out.name), dir=out.parent))
    except OSError as e:
        raise UserError(f"{out}: cannot be written ({e.strerror or e})") from None
    try:
        yield tmp
    except OSError as e:
        raise UserError(f"{out}: cannot be written ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_folder(out: Path, write):
    """write(folder) into a temporary folder beside `out` (staged), renamed to `out` once complete, so that a
    failed or interrupted write leaves nothing half-written; an existing `out` is replaced only then."""
    with staged(out) as tmp:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private: the result is not
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            with holding_stops():  # a stop between the two renames would leave neither folder at `out`
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old)
        else:
            os.replace(tmp, out)


def remove_leftovers(folder: Path):
    """Remove the temporary folders (staged) that killed processes left in `folder`."""
    for entry in folder.iterdir() if folder.is_dir() else []:
        match = TEMPORARY.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not process_alive(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextlib.contextmanager
def exclusive(out: Path, flag: str, lock: Path):
    """Hold the lock file `lock` (flock, which the system releases if the process dies) while the block writes
    `out`, so that two runs never write the same files; another run holding it is an error. Taking it also
    shows that the folder can be written, before anything is loaded. The temporary leftovers of killed runs
    in the lock's folder are then removed."""
    import fcntl

    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(f"{flag} {out}: another run (process {holder}) is writing it; wait for it to end "
                                f"or write elsewhere") from None
            # the run before may have removed the file between our open and flock: hold the one at `lock`
            if os.path.exists(lock) and os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        raise UserError(f"{flag} {out}: cannot be written ({e.strerror or e})") from None
    try:
        remove_leftovers(lock.parent)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def check_writable(path, flag: str, folder=False):
    """Before any work, that a file (or folder) can be written at `path` as atomic_write (write_folder) writes
    it: its name, and the longer temporary one it is written under (staged), within the file system's limit;
    no folder or other non-file (no file) in its place; the folder it is in, and the folder itself, where they
    are, ones this process can write in. Else one UserError naming the flag and the path."""
    path = Path(path)
    try:
        name_max = os.pathconf(next(p for p in (path.parent, *path.parent.parents) if p.exists()), "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    excess = len(temporary_prefix(path.name).encode()) + RANDOM_CHARACTERS - name_max
    if excess > 0:
        raise UserError(f"{flag}: {path}: the name is too long: it is written first under a temporary name "
                        f"{excess} bytes longer than the file system's {name_max}; give a name of at most "
                        f"{len(path.name.encode()) - excess} bytes")
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag}: {path}: is a file, where a folder is to be written; move it or write elsewhere")
    if not folder and os.path.lexists(path) and not (path.is_symlink() or path.is_file()):
        what = "a folder" if path.is_dir() else "not a regular file"
        raise UserError(f"{flag}: {path}: is {what}, where a file is to be written; move it or write elsewhere")
    for place in (path.parent, path) if folder else (path.parent,):
        if place.is_dir() and not os.access(place, os.W_OK | os.X_OK):
            raise UserError(f"{flag}: {place}: cannot be written (Permission denied)")


# The files of a model or adapter folder, which --force may replace: those the scripts write (config.json,
# weights, tokenizer, README.md, PEFT's adapter files), and those of a Hugging Face model folder beside them
MODEL_FOLDER_FILES = re.compile(r"(generation_)?config\.json|README\.md|.+\.safetensors(\.index\.json)?|tokenizer.*"
                                r"|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt"
                                r"|chat_template\.(jinja|json)|adapter_config\.json|\.gitattributes")


def output_folder(path, flag: str, force: bool, sources=()) -> Path:
    """The folder a script is to write, checked before any work (check_writable): refused if it is a file, or a
    folder that is not empty, unless force and it is a model or adapter folder (MODEL_FOLDER_FILES, with its
    config.json or adapter_config.json); never one that holds a source the script reads, or the current folder."""
    out = Path(path)
    check_writable(out, flag, folder=True)
    if out.is_dir() and any(out.iterdir()):
        for source in [*sources, "."]:
            if source is not None and Path(source).exists() and is_within(Path(source), out):
                what = "the current folder" if source == "." else source
                raise UserError(f"{flag} {out}: holds {what}, which replacing it would delete")
        if not force:
            raise UserError(f"{flag} {out}: exists and is not empty (pass --force to replace it)")
        foreign = sorted(e.name for e in out.iterdir() if not (e.is_file() and MODEL_FOLDER_FILES.fullmatch(e.name)))
        why = None
        if foreign:
            why = f"holds {foreign[0]}" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
        elif not ((out / "config.json").is_file() or (out / "adapter_config.json").is_file()):
            why = "has no config.json"
        if why:
            raise UserError(f"{flag} {out}: {why}: not a model folder, the only kind --force replaces; empty it "
                            f"yourself or write elsewhere")
    return out


def is_within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


# Saving models, and the hub


def save_weights(folder, tensors, shard_bytes: int = 5 * 10**9):
    """Write (name, array) pairs as safetensors shards of at most shard_bytes with their index, in Hugging
    Face's naming. The arrays are evaluated one at a time as they come, so that lazily read or converted
    weights are never all in memory: at most a shard is."""
    folder = Path(folder)
    shards, where, shard, size, total = [], {}, {}, 0, 0

    def write_shard():
        shards.append(folder / f".shard-{len(shards)}.tmp.safetensors")
        save_safetensors(shards[-1], shard, {"format": "pt"})
        where.update({name: len(shards) - 1 for name in shard})
        shard.clear()
        mx.clear_cache()  # MLX keeps freed buffers for reuse: give them back

    for name, value in tensors:
        mx.eval(value)
        if shard and size + value.nbytes > shard_bytes:
            write_shard()
            size = 0
        shard[name] = value
        size += value.nbytes
        total += value.nbytes
    write_shard()
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for tmp, name in zip(shards, names):
        os.replace(tmp, folder / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in where.items()}}
    write_json(folder / "model.safetensors.index.json", index)


def save_model(path, model: nn.Module, tokenizer, config: dict, shard_bytes: int = 5 * 10**9, what="the model"):
    """A model folder in the Hugging Face layout: config.json, safetensors shards with an index, tokenizer.
    Float weights are saved in the config's type (the model may compute in another: float32 on the CPU), under
    the checkpoint's names; one that is not finite in it is an error naming `what` and the tensor."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = getattr(mx, config.get("dtype") or config.get("torch_dtype") or "float16")
    names = model.args.names
    weights = ((names.theirs(k), narrowed(v, dtype, f"{what}: tensor {names.theirs(k)}")
                if mx.issubdtype(v.dtype, mx.floating) else v)
               for name, value in tree_flatten(model.parameters()) for k, v in names.unstacked(name, value))
    save_weights(path, weights, shard_bytes)
    write_json(path / "config.json", config)
    tokenizer.save_pretrained(str(path))


def output_config(config: dict, dtype=None, quantized=None) -> dict:
    """The config.json of a written model: the source's, with its float type set to `dtype` (if given) and
    its quantization that of the `quantized` layers ({path: {"group_size", "bits"}}, the model's paths), if any."""
    names = models.checkpoint_names(config)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if dtype is not None:
        config["dtype" if "dtype" in config else "torch_dtype"] = dtype
    if quantized:
        config["quantization"] = quantization_entry({names.theirs(p): q for p, q in quantized.items()})
    return config


def quantization_entry(layers: dict) -> dict:
    """config.json's "quantization" for layers quantized with {path: {"group_size", "bits"}}, in mlx-lm's
    layout: the most common settings, and the layers that differ listed by their path."""
    common = dict(Counter(tuple(sorted(p.items())) for p in layers.values()).most_common(1)[0][0])
    return dict(common, mode="affine",
                **{path: dict(params, mode="affine") for path, params in layers.items() if params != common})


def gguf_arch(args: models.ModelArgs) -> models.GGUFArch:
    """The architecture llama.cpp reads this model as, or a UserError naming what it would not compute alike."""
    arch = models.GGUF_ARCHS.get(args.model_type)
    if arch is None:
        raise UserError(f"model_type {args.model_type!r} is not written as GGUF (these are: "
                        f"{', '.join(models.GGUF_ARCHS)})")
    where = f"not written as GGUF for {args.model_type} (llama.cpp's {arch.arch})"
    if args.hidden_act not in arch.activations:
        raise UserError(f"hidden_act {args.hidden_act!r} is {where}: it computes {', '.join(arch.activations)}")
    if args.rope_type not in arch.ropes:
        raise UserError(f"rope scaling {args.rope_type!r} is {where}: it computes {', '.join(arch.ropes)}")
    if permutes_qk(args, arch) and args.rope["partial_rotary_factor"] != 1.0:
        raise UserError(f"partial_rotary_factor {args.rope['partial_rotary_factor']} is {where}")
    for key, plain in models.GGUF_PLAIN.items():
        if key not in arch.computes and getattr(args, key) != plain:
            raise UserError(f"{key} {getattr(args, key)!r} is {where}")
    return arch


def permutes_qk(args: models.ModelArgs, arch: models.GGUFArch) -> bool:
    """Whether q and k rows go from Hugging Face's rope layout (rotating each head's two halves) to llama.cpp's
    pairs of neighbours: the inverse of read_gguf's permutation."""
    return arch.rope_pairs and not args.rope_interleaved


def gguf_keys(args: models.ModelArgs, arch: models.GGUFArch) -> dict:
    """The GGUF metadata of this model but its vocabulary, {GGUFWriter's add_ method without add_: value}, as
    llama.cpp's converter writes them; a UserError names a setting that it cannot hold."""
    import gguf

    rope = args.rope
    keys = {"block_count": args.num_hidden_layers, "context_length": args.max_position_embeddings,
            "embedding_length": args.hidden_size, "feed_forward_length": args.intermediate_size,
            "head_count": args.num_attention_heads, "head_count_kv": args.num_key_value_heads,
            "key_length": args.head_dim, "value_length": args.head_dim, "vocab_size": args.vocab_size,
            "rope_dimension_count": int(args.head_dim * rope["partial_rotary_factor"]),
            "rope_freq_base": float(rope.get("rope_theta", 10000.0))}
    if args.norm in ("layer", "layer_no_bias"):
        keys["layer_norm_eps"] = args.layer_norm_eps
    else:
        keys["layer_norm_rms_eps"] = args.rms_norm_eps
    if args.num_local_experts:
        keys.update(expert_count=args.num_local_experts, expert_used_count=args.num_experts_per_tok)
    if args.rope_type == "linear":
        keys.update(rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=rope["factor"])
    elif args.rope_type == "longrope":
        keys.update(rope_scaling_type=gguf.RopeScalingType.LONGROPE, rope_scaling_attn_factors=models.RoPE(
            args, rope).gain, rope_scaling_orig_ctx_len=rope.get("original_max_position_embeddings"))
    try:
        return {**keys, **(arch.keys(args) if arch.keys else {})}
    except ValueError as e:
        raise UserError(f"{e}: not written as GGUF") from None


# each tensor's GGUF name: the llama architecture's, from ours (read_gguf's, the other way)
LLAMA_GGUF_NAMES = {hf: name for name, hf in GGUF_NAMES.items()}


def gguf_name(name: str, arch: models.GGUFArch) -> str:
    """llama.cpp's name of our weight `name` in `arch` (a mixture's experts are stacked in both, under the name of
    the pattern that targets each expert: experts.*.w1). A weight that llama.cpp's architecture does not have is
    a UserError."""
    import gguf

    names = {**LLAMA_GGUF_NAMES, **arch.names}
    module, kind = name.rsplit(".", 1)
    layer = re.match(r"model\.layers\.(\d+)\.(.*)", module)
    path = module if layer is None else layer[2].replace(".experts.", ".experts.*.")
    listed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf_model_arch(arch)]}
    found = names.get(path) if layer is None else f"blk.{{bid}}.{names.get(path)}"
    if path not in names or found not in listed:
        raise UserError(f"{name} is not a weight of llama.cpp's {arch.arch}" + (
            " (its output layer is the embedding: tie_word_embeddings)" if path == "lm_head" else ""))
    named = found if layer is None else found.format(bid=layer[1])
    return f"{named}.{kind}"


def gguf_model_arch(arch: models.GGUFArch):
    """gguf's MODEL_ARCH of `arch`."""
    import gguf

    return next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch.arch)


def gguf_vocabulary(args: models.ModelArgs, tokenizer) -> dict:
    """The tokenizer's GGUF metadata ({GGUFWriter's add_ method without add_: value}), or a UserError saying why
    it cannot be written. A byte-level BPE tokenizer (GPT-2's kind: Llama 3, Qwen, SmolLM) is its tokens and
    merges ("gpt2"). A SentencePiece BPE one (byte fallback: Llama 2, Mistral v0.1, Gemma) is its tokens with
    scores ("llama"): llama.cpp merges the neighbours whose token scores highest, which is the merges' order when
    a token's score is minus the rank of the first merge that makes it, and every split of a token into two
    tokens is a merge (so SentencePiece's own tokenizers are converted)."""
    vocab = json.loads(tokenizer.backend_tokenizer.to_str())
    model = vocab["model"]
    if model["type"] != "BPE":
        raise UserError(f"a {model['type']} tokenizer is not written as GGUF (BPE ones are: GPT-2's byte-level kind, "
                        f"and SentencePiece's with byte fallback)")
    special = {t["id"] for t in vocab["added_tokens"] if t["special"]}
    added = {t["id"] for t in vocab["added_tokens"]}
    ids = {**model["vocab"], **{t["content"]: t["id"] for t in vocab["added_tokens"]}}
    beyond = max(ids, key=ids.get)
    if ids[beyond] >= args.vocab_size:
        raise UserError(f"the tokenizer's token {beyond!r} (id {ids[beyond]}) has no row in the embedding "
                        f"(vocab_size {args.vocab_size}): llama.cpp needs one for each token")
    tokens = [f"[PAD{i}]" for i in range(args.vocab_size)]
    for token, i in ids.items():
        tokens[i] = token
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    if not model.get("byte_fallback"):
        return {"tokenizer_model": "gpt2", "tokenizer_pre": gguf_pre_tokenizer(vocab), "token_list": tokens,
                "token_types": [3 if i in special else 1 for i in range(len(tokens))],  # 3: control
                "token_merges": [" ".join(m) for m in merges]}
    pairs = {tuple(m) for m in merges}
    for token in model["vocab"]:
        for i in range(1, len(token)):
            if token[:i] in model["vocab"] and token[i:] in model["vocab"] and (token[:i], token[i:]) not in pairs:
                raise UserError(f"the tokenizer's merges lack {token[:i]!r} + {token[i:]!r}: a BPE tokenizer with "
                                f"byte fallback is written as GGUF where it is SentencePiece's (every split a merge)")
    scores = [0.0] * len(tokens)
    for rank, (left, right) in reversed(list(enumerate(merges))):
        scores[model["vocab"][left + right]] = -float(rank)
    unknown = model["vocab"].get(model.get("unk_token"))
    # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    types = [2 if i == unknown else 3 if i in special else 4 if i in added else 5 if token == f"[PAD{i}]"
             else 6 if re.fullmatch(r"<0x[0-9A-F]{2}>", token) else 1 for i, token in enumerate(tokens)]
    prefixed = any(step.get("type") == "Prepend" or step.get("prepend_scheme") in ("first", "always")
                   for part in (vocab["normalizer"], vocab["pre_tokenizer"]) if part
                   for step in part.get("normalizers", part.get("pretokenizers", [part])))
    return {"tokenizer_model": "llama", "tokenizer_pre": "default", "token_list": tokens, "token_scores": scores,
            "token_types": types, "add_space_prefix": prefixed}


# The pre-tokenizers of byte-level BPE tokenizers (how the text is split into words before the merges), as their
# tokenizer.json describes them ({step's type: its pattern or setting}), and llama.cpp's name for each: the regular
# expression of Llama 3 (and OpenAI's cl100k: without ignore_merges), Qwen2's (digits one by one), GPT-2's, and
# GPT-2's after each digit apart (SmolLM, StarCoder).
WORDS_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = [
    ({"Split": WORDS_LLAMA3, "ByteLevel": False, "ignore_merges": True}, "llama-bpe"),
    ({"Split": WORDS_LLAMA3, "ByteLevel": False, "ignore_merges": False}, "dbrx"),
    ({"Split": WORDS_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}"), "ByteLevel": False, "ignore_merges": False}, "qwen2"),
    ({"ByteLevel": True, "ignore_merges": False}, "gpt-2"),
    ({"Digits": True, "ByteLevel": True, "ignore_merges": False}, "smollm"),
]


def gguf_pre_tokenizer(vocab: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of the byte-level BPE tokenizer `vocab` (tokenizer.json), or a
    UserError where it is none of GGUF_PRE_TOKENIZERS."""
    pre = vocab["pre_tokenizer"] or {}
    described = {"ignore_merges": bool(vocab["model"].get("ignore_merges"))}
    for step in pre.get("pretokenizers", [pre]):
        described[step.get("type")] = {"Split": (step.get("pattern") or {}).get("Regex"),
                                       "ByteLevel": not step.get("add_prefix_space") and step.get("use_regex", True),
                                       "Digits": step.get("individual_digits")}.get(step.get("type"))
    found = next((name for known, name in GGUF_PRE_TOKENIZERS if known == described), None)
    if found is None:
        raise UserError(f"the tokenizer's pre-tokenizer ({', '.join(k for k in described if k != 'ignore_merges')}) "
                        f"is not one that llama.cpp is known here to split text as (GPT-2's, Llama 3's, Qwen2's, "
                        f"SmolLM's): not written as GGUF")
    return found


def check_gguf_export(model: models.Model, tokenizer):
    """What write_gguf would refuse, refused now."""
    arch = gguf_arch(model.args)
    gguf_keys(model.args, arch)
    for name, _ in tree_flatten(gguf_parameters(model)):
        gguf_name(name, arch)
    gguf_vocabulary(model.args, tokenizer)


def gguf_parameters(model: models.Model) -> dict:
    # the weights kept beside the decoder (an image encoder) go to a file of their own in llama.cpp
    return {k: v for k, v in model.parameters().items() if k != models.KEPT}


def gguf_rows(value: mx.array, base: str, args: models.ModelArgs, arch: models.GGUFArch) -> mx.array:
    """The rows (outputs, the first axis) of the weight or bias of llama.cpp's tensor `base` (blk.N.attn_q), or
    of its LoRA's lora_b [output, rank], in llama.cpp's order: q and k permuted for its rope (permutes_qk)."""
    if not (base.endswith(("attn_q", "attn_k")) and permutes_qk(args, arch)):
        return value
    heads = args.num_attention_heads if base.endswith("attn_q") else args.num_key_value_heads
    rows, rest = value.shape[0], value.shape[1:]
    return value.reshape(heads, 2, rows // heads // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def gguf_tensors(model: models.Model, arch: models.GGUFArch, path):
    """(name, numpy array) of each tensor of the GGUF file, as llama.cpp's converter writes them: q/k rows
    permuted for its rope (permutes_qk), norms plus one where the family's scale by 1 + weight, rope factors
    where the rope scales by frequency; norms, biases, routers and vectors in float32, the rest in float16 (a
    value beyond its range an error naming the file written, `path`)."""
    import numpy as np

    args = model.args
    for name, value in tree_flatten(gguf_parameters(model)):
        target = gguf_name(name, arch)
        base = target.rsplit(".", 1)[0]
        value = gguf_rows(value, base, args, arch)
        wide = (value.ndim == 1 or base.endswith(("norm", "ffn_gate_inp", "ffn_gate_inp_shexp"))
                or target.endswith(".bias"))
        value = narrowed(value, mx.float32 if wide else mx.float16, f"{path}: tensor {target}")
        if base.endswith("norm") and arch.norm_plus_one:  # in float32: bfloat16 would round 1 + weight to 2^-7
            value = value + 1
        yield target, np.array(value)
    if args.rope_type == "llama3":  # llama.cpp divides each frequency by its factor
        rope = models.RoPE(args, args.rope)
        unscaled = rope.base ** (-np.arange(0, rope.dims, 2) / rope.dims)
        yield "rope_freqs.weight", (np.array(rope.frequencies(1)) * unscaled).astype(np.float32)
    elif args.rope_type == "longrope":
        for kind in ("long", "short"):
            yield f"rope_factors_{kind}.weight", np.array(args.rope[f"{kind}_factor"], np.float32)


def write_gguf(path, model: models.Model, tokenizer):
    """A float16 GGUF file of the model, in llama.cpp's layout for its family (models.GGUF_ARCHS), with the
    tokenizer in its metadata."""
    import gguf

    args = model.args
    arch = gguf_arch(args)
    keys = gguf_keys(args, arch)
    vocabulary = gguf_vocabulary(args, tokenizer)

    def fill(writer):
        for key, value in keys.items():
            getattr(writer, f"add_{key}")(value)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        for key, value in vocabulary.items():
            getattr(writer, f"add_{key}")(value)
        for name in ("bos", "eos", "unk", "pad"):
            if getattr(tokenizer, f"{name}_token_id", None) is not None:
                getattr(writer, f"add_{name}_token_id")(getattr(tokenizer, f"{name}_token_id"))
        writer.add_add_bos_token(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id])
        if isinstance(tokenizer.chat_template, str):
            writer.add_chat_template(tokenizer.chat_template)
        for name, value in gguf_tensors(model, arch, path):
            writer.add_tensor(name, value)

    save_gguf(path, arch, fill)


def save_gguf(path, arch: models.GGUFArch, fill):
    """A GGUF file of llama.cpp's architecture `arch`, whose metadata and tensors fill(writer) adds to gguf's
    GGUFWriter, written beside `path` and renamed to it once complete (staged)."""
    import gguf

    path = Path(path)
    with staged(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp / path.name), arch.arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp / path.name, path)


def check_gguf_adapter_export(model: models.Model, adapter_config: dict) -> float:
    """What write_gguf_adapter would refuse, refused now: a family llama.cpp has no architecture for, a layer its
    architecture has no tensor for, a scale of 0 (llama.cpp reads an alpha of 0 as no scaling). The alpha of the
    adapters that adapter_config describes: llama.cpp scales them by alpha / rank, so our scale times the rank."""
    arch = gguf_arch(model.args)
    for path, layer in models.lora_layers(model).items():
        gguf_name(f"{path}.weight", arch)
        if isinstance(layer, models.LoRAEmbedding) and model.args.tie_word_embeddings:
            raise UserError(f"{path}: llama.cpp applies an adapter of token_embd to the input alone, not to the output "
                            f"layer that shares its weight here (tie_word_embeddings): fuse with --export-gguf instead")
    params = adapter_config["lora_parameters"]
    if params["scale"] == 0:
        raise UserError("the adapters' scale is 0: llama.cpp reads their alpha, 0, as none, and scales them by 1")
    return params["scale"] * params["rank"]


def gguf_adapter_tensors(model: models.Model, arch: models.GGUFArch):
    """(name, numpy array) of each tensor of the model's LoRA adapters as llama.cpp's convert_lora_to_gguf.py
    writes them: for the base's tensor X, X.lora_a [rank, input] and X.lora_b [output, rank] (PEFT's lora_A and
    lora_B; for a stack of experts [experts, ...], the experts not adapted with zeros; for token_embd, lora_a
    [vocabulary, rank], PEFT's lora_embedding_A transposed, as the converter writes it), lora_b's rows in the
    order of the base's (gguf_rows), in float32."""
    import numpy as np

    for path, layer in models.lora_layers(model).items():
        target = gguf_name(f"{path}.weight", arch)
        if isinstance(layer, models.ExpertsLoRA):
            lora_a, lora_b = layer.lora_a, layer.adapted_b()
        elif isinstance(layer, models.LoRAEmbedding):  # token_embd.lora_a [vocabulary, rank]: llama.cpp takes its rows
            lora_a, lora_b = layer.lora_a, layer.lora_b.T
        else:
            lora_a, lora_b = layer.lora_a.T, gguf_rows(layer.lora_b.T, target.rsplit(".", 1)[0], model.args, arch)
        yield f"{target}.lora_a", np.array(lora_a.astype(mx.float32))
        yield f"{target}.lora_b", np.array(lora_b.astype(mx.float32))


def write_gguf_adapter(path, model: models.Model, adapter_config: dict):
    """The model's LoRA adapters, which adapter_config describes, unfused, as a GGUF file that llama.cpp loads
    beside the base model's GGUF file (llama-cli -m base.gguf --lora PATH), as its convert_lora_to_gguf.py
    writes them: general.type "adapter", adapter.type "lora", adapter.lora.alpha, and gguf_adapter_tensors."""
    import gguf

    alpha = check_gguf_adapter_export(model, adapter_config)
    arch = gguf_arch(model.args)

    def fill(writer):
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for name, value in gguf_adapter_tensors(model, arch):
            writer.add_tensor(name, value)

    save_gguf(path, arch, fill)


def model_card(name: str, source: str, what: str) -> str:
    """A short README.md for a model folder, naming its source (linked, and as base_model, if a hub repo)."""
    hub = is_repo_id(source)
    link = f"[{source}](https://huggingface.co/{source})" if hub else f"`{source}`"
    header = "---\nlibrary_name: mlx\ntags:\n- mlx\n" + (f"base_model: {source}\n" if hub else "") + "---\n"
    return f"{header}\n# {name}\n\nMade from {link}: {what}.\n\n```\npython lora.py --model {name} --prompt \"Hello\"\n```\n"


def hub_client(repo: str):
    """The hub client, once it is known that it has a token and reaches the hub (before any long work)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalTokenNotFoundError

    api = HfApi()
    try:
        api.whoami()
    except LocalTokenNotFoundError:
        raise UserError(f"{repo}: no Hugging Face token; log in with `hf auth login` "
                        f"or set HF_TOKEN") from None
    except Exception as e:  # no network, or a token the hub refuses
        raise UserError(f"{repo}: the Hugging Face hub cannot be reached or refuses the token "
                        f"({type(e).__name__}: {first_line(e)})") from None
    return api


def upload(api, folder: Path, repo: str, what: str):
    try:
        api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message=f"Upload {repo}, {what}")
    except Exception as e:  # the hub client raises many kinds
        raise UserError(f"{repo}: upload failed ({type(e).__name__}: {first_line(e)}); "
                        f"the model is in {folder}") from None
    print(f"Uploaded to https://huggingface.co/{repo}", flush=True)


# Adapters


def adapter_config_path(adapter_file) -> Path:
    return Path(adapter_file).with_name("adapter_config.json")


def adapts_embeddings(names) -> bool:
    """Whether adapters of these weights' names (any model's, PEFT's too) adapt the embedding or the output layer,
    whose training goes with the tokenizer's tokens: training saves the tokenizer beside them (save_tokenizer)."""
    return any(name.rsplit(".", 1)[0].endswith(("embed_tokens", "lm_head")) for name in names)


def save_tokenizer(folder: Path, tokenizer):
    """The tokenizer's files, as save_pretrained writes them (tokenizer.json, tokenizer_config.json, the chat
    template), into `folder`, each replacing its old one whole (staged)."""
    with staged(folder / "tokenizer.json") as tmp:
        for path in tokenizer.save_pretrained(tmp):
            os.replace(path, folder / Path(path).name)


def adapters_tokenizer(adapters, adapter_path, model: models.Model):
    """The tokenizer saved beside adapters of the embedding or output layer (adapts_embeddings: a file's folder, or
    the adapter folder), used rather than the model's, so that the tokens and chat template they were trained with
    go with them; None where there is none."""
    folder = Path(adapter_path) if Path(adapter_path).is_dir() else Path(adapter_path).parent
    if not adapts_embeddings(adapters.weights) or not (folder / "tokenizer_config.json").exists():
        return None
    tokenizer = read_tokenizer(folder)
    if len(tokenizer) > model.args.vocab_size:
        raise UserError(f"{folder}: its tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary of "
                        f"{model.args.vocab_size} (new tokens are not supported)")
    print(f"Using the tokenizer beside the adapters, in {folder}", flush=True)
    return tokenizer


def save_adapters(adapter_file, model: nn.Module, adapter_config: dict):
    """The trainable (LoRA) weights as .safetensors or .npz (by extension), with adapter_config.json beside; a
    stack of experts' per expert (models.per_expert), PiSSA's and OLoRA's of the original weight
    (models.saved_adapters)."""
    adapter_file = Path(adapter_file)
    weights = models.per_expert(model, models.saved_adapters(model, dict(tree_flatten(model.trainable_parameters()))))
    if adapter_file.suffix == ".npz":
        atomic_write(adapter_file, lambda f: mx.savez(f, **weights))
    else:
        atomic_write(adapter_file, lambda f: mx.save_safetensors(f, weights, metadata={"format": "mlx"}))
    write_json(adapter_config_path(adapter_file), adapter_config)


# PEFT's names for a layer's adapter weights, base_model.model.<layer>.<name>, of every adapter kind
# (models.AdapterKind.peft_names): lora_A (rank x input) is lora_a transposed, ...
PEFT_NAMES = {ours: theirs for kind in models.ADAPTER_KINDS.values() for ours, theirs in kind.peft_names.items()}


# and an embedding's (models.LoRAEmbedding, ...): lora_embedding_A, ...
PEFT_EMBEDDING_NAMES = {ours: theirs for kind in models.ADAPTER_KINDS.values()
                        for ours, theirs in kind.embedding_layer.peft_names.items()}
PEFT_KEY = re.compile(rf"base_model\.model\.(.+)\."
                      rf"({'|'.join(map(re.escape, [*PEFT_NAMES.values(), *PEFT_EMBEDDING_NAMES.values()]))})")
# the copy of the embedding's and output layer's weights that PEFT saves with their adapters (save_embedding_layers)
PEFT_BASE_KEY = re.compile(r"base_model\.model\.(.*(?:embed_tokens|lm_head))\.base_layer\.weight")


# mlx-lm's adapter_config.json "fine_tune_type": the weights each kind holds, per layer (none: full weights)
ADAPTER_WEIGHTS = {**{name: kind.weights for name, kind in models.ADAPTER_KINDS.items()}, "full": ()}


class Adapters(NamedTuple):
    """Adapters as read_adapters reads them: weights named as the model holds them (<layer>.lora_a,
    <layer>.lora_b and DoRA's <layer>.m; or, for "full", Hugging Face-named weights of decoder layers), and
    the adapter_config.json that records them, as this toolkit writes it (fine_tune_type; for LoRA and DoRA,
    lora_parameters: rank, scale, dropout), a PEFT config translated."""
    weights: dict
    config: dict

    @property
    def fine_tune_type(self) -> str:
        return self.config["fine_tune_type"]


def read_adapters(adapter_path, scale=20.0) -> Adapters:
    """The adapters of an adapter file (.safetensors or .npz, with or without adapter_config.json beside it;
    without, LoRA of the weights' rank and this scale), an adapter folder of mlx-lm or this toolkit
    (adapters.safetensors + adapter_config.json), or a PEFT LoRA or DoRA folder."""
    path = Path(adapter_path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        config_path = path / "adapter_config.json"
        if not config_path.exists():
            raise UserError(f"{path}: no adapter_config.json (an adapter folder needs its config)")
        config = read_json(config_path)
        if "peft_type" in config:
            return read_peft(path, config)
        path = path / "adapters.safetensors"
        if not path.exists():
            raise UserError(f"{path.parent}: no adapters.safetensors (mlx-lm) or adapter_model.safetensors (PEFT)")
    else:
        config_path = adapter_config_path(path)
        config = read_json(config_path) if config_path.exists() else {}
    fine_tune_type = config.get("fine_tune_type", "lora")
    if not isinstance(fine_tune_type, str) or fine_tune_type not in ADAPTER_WEIGHTS:
        raise UserError(f"{config_path}: fine_tune_type {fine_tune_type!r} is not supported "
                        f"({', '.join(ADAPTER_WEIGHTS)})")
    weights = adapter_weights(path)
    config = {**config, "fine_tune_type": fine_tune_type}
    if fine_tune_type == "full":
        return Adapters(weights, config)
    params = config.get("lora_parameters", {})
    if not isinstance(params, dict):
        raise UserError(f"{config_path}: lora_parameters is {params!r}, expected an object")
    params = {**params, "scale": params.get("scale", scale), "dropout": params.get("dropout", 0.0),
              "rank": check_rank(weights, params.get("rank"), config_path, fine_tune_type)}
    for key in ("scale", "dropout"):
        if not is_number(params[key]):
            raise UserError(f"{config_path}: lora_parameters.{key} is {params[key]!r}, expected a number")
    if not isinstance(params.get("use_rslora", False), bool):
        raise UserError(f"{config_path}: lora_parameters.use_rslora is {params['use_rslora']!r}, expected true or "
                        f"false")
    return Adapters(weights, {**config, "lora_parameters": params})


def adapter_weights(path: Path) -> dict:
    """The arrays of an adapter file, each of a float type."""
    weights = read_arrays(path)
    for name, value in weights.items():
        if not mx.issubdtype(value.dtype, mx.floating):
            raise UserError(f"{path}: {name} holds {value.dtype} values, not floating point ones")
    check_finite(weights, path)
    return weights


def check_rank(weights: dict, rank, config_path, kind: str) -> int:
    """The adapters' rank: the one adapter_config.json records (None: not recorded), which must be the
    weights' own (those of the kind's first array, [input, rank]), as the scale derived from it (PEFT's alpha / r)
    and the layers built from it would be wrong."""
    ranked = "." + ADAPTER_WEIGHTS[kind][0]
    found = sorted({v.shape[-1] for k, v in weights.items() if k.endswith(ranked) and v.ndim == 2})
    if rank is None and len(found) > 1:
        raise UserError(f"{config_path}: the adapters' ranks differ ({', '.join(map(str, found))}); one is supported")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or found and found != [rank]):
        raise UserError(f"{config_path}: says rank {rank!r}, but the weights' rank is "
                        f"{', '.join(map(str, found)) or 'unknown'}")
    return found[0] if rank is None and found else rank


def read_peft(folder: Path, config: dict) -> Adapters:
    config_path = folder / "adapter_config.json"
    rank, alpha, dropout = config.get("r"), config.get("lora_alpha", 8), config.get("lora_dropout", 0.0)
    if config["peft_type"] != "LORA":
        raise UserError(f"{config_path}: PEFT adapters of type {config['peft_type']} are not supported (LORA)")
    for key, supported in (("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, supported) != supported:
            raise UserError(f"{config_path}: {key} = {config[key]!r} is not supported (only {supported!r})")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication"):
        if config.get(key):
            raise UserError(f"{config_path}: {key} is not supported")
    if str(config.get("init_lora_weights")).startswith(("pissa", "olora", "corda", "loftq")):  # a changed base
        raise UserError(f"{config_path}: init_lora_weights {config['init_lora_weights']!r}: these adapters apply to "
                        f"the residual of its start, not to the base model; save them as PEFT converts them "
                        f"(path_initial_model_for_weight_conversion)")
    path = folder / "adapter_model.safetensors"
    if not path.exists():
        raise UserError(f"{folder}: no adapter_model.safetensors (an adapter_model.bin is not read: "
                        f"save it with safe_serialization=True)")
    ours = {theirs: name for names in (PEFT_NAMES, PEFT_EMBEDDING_NAMES) for name, theirs in names.items()}
    weights, base_rows = {}, {}
    for key, value in adapter_weights(path).items():
        base = PEFT_BASE_KEY.fullmatch(key)
        if base:  # the base's own, unless the vocabulary was resized (tied_paths)
            base_rows[base[1]] = value.shape[0]
            continue
        match = PEFT_KEY.fullmatch(key)
        if match is None:
            raise UserError(f"{path}: {key} is not a LoRA or DoRA weight of a linear layer or embedding")
        weights[f"{match[1]}.{ours[match[2]]}"] = value.T
    kind = next((name for name, kind in models.ADAPTER_KINDS.items()
                 if all((config.get(key) or False) == value for key, value in kind.peft_config.items())), None)
    if kind is None:
        fields = sorted({key for kind in models.ADAPTER_KINDS.values() for key in kind.peft_config})
        raise UserError(f"{config_path}: " + ", ".join(f"{key} = {config.get(key)!r}" for key in fields) +
                        " is not a supported kind of adapter")
    check_rank(weights, rank, config_path, kind)
    if rank is None or rank < 1 or not is_number(alpha) or not is_number(dropout):
        raise UserError(f"{config_path}: r is {rank!r}, lora_alpha {alpha!r} and lora_dropout {dropout!r}; "
                        f"expected a rank of at least 1 and numbers")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    rslora = {"use_rslora": True} if config.get("use_rslora") else {}
    # whether an adapter of a tied embedding adapts the output layer too (tied_paths)
    tying = {"ensure_weight_tying": bool(config.get("ensure_weight_tying"))}
    return Adapters(weights, {"base_model": config.get("base_model_name_or_path"), "fine_tune_type": kind,
                              "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, **rslora},
                              "peft_base_rows": base_rows, **tying})


def load_adapters(model: nn.Module, adapter_path, scale=20.0, base=None):
    """Load the adapters of adapter_path (read_adapters; `scale` where nothing records it): apply_adapters."""
    return apply_adapters(model, read_adapters(adapter_path, scale), adapter_path, base=base)


# What adapter_config.json records of the model the adapters were made on (base_model_config): its family and
# vocabulary, and the depth and width that say where the adapters' layers are and what shapes they have
BASE_MODEL_KEYS = ("model_type", "vocab_size", "num_hidden_layers", "hidden_size")


def base_model_config(model: models.Model) -> dict:
    return {k: getattr(model.args, k) for k in BASE_MODEL_KEYS}


def check_base_model(model: models.Model, config: dict, adapter_path, base=None):
    """Adapters whose config (an adapter_config.json) records a base model of another depth or width than
    `model` are an error: their layers are not this model's, though their shapes may fit (the last layers of a
    shallower model are middle ones here). One of another family or vocabulary, or another path than `base`
    (the --model that names `model`), is a warning: a moved folder, or a fine-tuned model of the same base,
    may be meant."""
    recorded, ours = config.get("base_model_config", {}), base_model_config(model)
    if not isinstance(recorded, dict):
        raise UserError(f"{adapter_path}: the base_model_config of its adapter_config.json is {recorded!r}, "
                        f"expected an object")
    differ = "; ".join(f"{k} {recorded[k]}, not {ours[k]}" for k in BASE_MODEL_KEYS
                       if recorded.get(k, ours[k]) != ours[k])
    if any(recorded.get(k, ours[k]) != ours[k] for k in ("num_hidden_layers", "hidden_size")):
        raise UserError(f"{adapter_path}: made for a model of {differ}, whose layers are not this one's")
    made_on = config.get("base_model") or config.get("model")  # this toolkit's and PEFT's, mlx-lm's
    moved = base is not None and isinstance(made_on, str) and not same_place(made_on, base)
    if differ or moved:
        of = f" of {differ}" if differ else ""
        print(f"[WARNING] {adapter_path}: made for {made_on if moved else 'a model'}{of}, not {base or 'this model'}.",
              flush=True)


def same_place(a: str, b: str) -> bool:
    """Whether two paths (or hub repo ids) name the same file or folder."""
    return Path(a).resolve() == Path(b).resolve() if Path(a).exists() and Path(b).exists() else a == b


def apply_adapters(model: nn.Module, adapters: Adapters, adapter_path, dropout=None, base=None):
    """Wrap the layers that the adapters have weights for (models.wrap_lora_layers) as their config says
    (dropout: the config's unless given), and load them; full weights are loaded over the model's own, and
    made trainable, as adapters are. Their names may be transformers' (PEFT's; models.CheckpointNames.ours).
    adapter_path names them in errors; first they are checked to be made for this model (check_base_model;
    `base` names it)."""
    check_base_model(model, adapters.config, adapter_path, base)
    weights = {model.args.names.ours(k): v for k, v in adapters.weights.items()}
    kind = adapters.fine_tune_type
    if kind == "full":
        return load_full_weights(model, weights, adapter_path)
    names = ADAPTER_WEIGHTS[kind]
    for key in sorted(weights):
        if key.rsplit(".", 1)[-1] not in names:
            raise UserError(f"{adapter_path}: {key} is not a weight of {kind} adapters "
                            f"({', '.join(names)}); is adapter_config.json's fine_tune_type right?")
    ranked = names[0]  # [input, rank]; every adapted layer has it
    paths = sorted({k.rsplit(".", 1)[0] for k in weights if k.endswith("." + ranked)})
    if not paths:
        raise UserError(f"{adapter_path}: holds no {kind} weights ({' / '.join('*.' + n for n in names)})")
    modules = dict(model.named_modules())
    paths = tied_paths(model, adapters, weights, paths, adapter_path)
    for path in paths:
        if models.adaptable_layer(modules, path) is None:
            raise UserError(f"{adapter_path}: layer {path} " + ("is not a linear layer" if path in modules else
                                                               "does not exist in this model (made for another base?)"))
        if weights[f"{path}.{ranked}"].ndim != 2:
            raise UserError(f"{adapter_path}: {path}.{ranked} has shape {tuple(weights[f'{path}.{ranked}'].shape)}, "
                            f"not (inputs, rank)")
    params = adapters.config["lora_parameters"]
    with naming_flag(str(adapter_path)):
        models.wrap_lora_layers(model, paths, params["rank"], params["scale"],
                                params["dropout"] if dropout is None else dropout, kind)
    # the adapters as the files hold them: an expert's apart from its stack's
    expected = models.per_expert(model, {f"{path}.{name}": m[name] for path, m in models.lora_layers(model).items()
                                         for name in names})
    for path in paths:
        for name in names:
            check_fits(adapter_path, f"{path}.{name}", weights.get(f"{path}.{name}"), expected[f"{path}.{name}"])
    model.load_weights(list(model.args.names.stacked(weights, model.args.num_local_experts).items()), strict=False)
    mx.eval(model.parameters())
    return model


def tied_paths(model: models.Model, adapters: Adapters, weights: dict, paths: list, adapter_path) -> list:
    """The adapted layers' paths, checked against the model's embedding and output layer: a vocabulary that PEFT
    saved resized (peft_base_rows) is refused; where the output layer is the embedding (tie_word_embeddings), an
    adapter of the embedding adapts both (models.LoRAEmbedding): PEFT's without ensure_weight_tying, which adapts
    the input alone, is refused, and an output layer's adapter is dropped where it is PEFT's tied copy of the
    embedding's (ensure_weight_tying saves it), else refused."""
    for path, rows in adapters.config.get("peft_base_rows", {}).items():
        if rows != model.args.vocab_size:
            raise UserError(f"{adapter_path}: made for a vocabulary of {rows} tokens (resized), this model's has "
                            f"{model.args.vocab_size}; new tokens are not supported")
    if not model.args.tie_word_embeddings:
        return paths
    embedding = "model.embed_tokens"
    if embedding in paths and adapters.config.get("ensure_weight_tying") is False:
        raise UserError(f"{adapter_path}: PEFT adapted the embedding without ensure_weight_tying on a model whose "
                        f"output layer is its embedding (tie_word_embeddings), adapting the input alone; here an "
                        f"embedding's adapter adapts both: save them with ensure_weight_tying=True")
    if "lm_head" in paths:
        copied = embedding in paths and all(
            mx.array_equal(weights[f"lm_head.{a}"], weights[f"{embedding}.{b}"].T).item()
            for a, b in (("lora_a", "lora_b"), ("lora_b", "lora_a")))
        if not copied:
            raise UserError(f"{adapter_path}: adapts lm_head apart from the embedding, but this model's output layer "
                            f"is its embedding (tie_word_embeddings)")
        del weights["lm_head.lora_a"], weights["lm_head.lora_b"]
        paths = [path for path in paths if path != "lm_head"]
    return paths


def load_full_weights(model: nn.Module, weights: dict, adapter_path):
    """Fully fine-tuned weights (fine_tune_type "full") over the model's own, in its dtype, made trainable; the
    experts' of a layer stacked (models.CheckpointNames.stacked), the model's own for an expert they lack."""
    params = dict(tree_flatten(model.parameters()))
    modules = dict(model.named_modules())
    names = model.args.names
    stacks = {expert[0] for expert in map(names.expert_of, weights) if expert and expert[0] in params}
    own = dict(pair for stack in stacks for pair in names.unstacked(stack, params[stack]))
    try:
        weights = names.stacked({**own, **weights})
    except ValueError as e:
        raise UserError(f"{adapter_path}: does not fit this model: {e}") from None
    for name, value in sorted(weights.items()):
        path = name.rsplit(".", 1)[0]
        if isinstance(modules.get(path), (nn.QuantizedLinear, nn.QuantizedEmbedding, models.QuantizedExpertsLinear)):
            raise UserError(f"{adapter_path}: holds full weights for {path}, which is quantized in this model "
                            f"(full weights load on a float base)")
        if name not in params:
            raise UserError(f"{adapter_path}: {name} does not exist in this model (made for another base?)")
        check_fits(adapter_path, name, value, params[name])
    model.load_weights([(k, v.astype(params[k].dtype)) for k, v in weights.items()], strict=False)
    for name in weights:  # trainable, as the layers of loaded adapters are
        path, key = name.rsplit(".", 1)
        modules[path].unfreeze(recurse=False, keys=[key])
    mx.eval(model.parameters())
    return model


def check_fits(adapter_path, name: str, stored, expected: mx.array):
    if stored is None or stored.shape != expected.shape:
        raise UserError(f"{adapter_path}: does not fit this model: {name} has shape "
                        f"{None if stored is None else tuple(stored.shape)}, the model's is {tuple(expected.shape)}")


def save_peft(folder, model: nn.Module, base_model: str, adapter_config: dict):
    """The model's adapters, which adapter_config describes, as a PEFT folder (adapter_model.safetensors,
    adapter_config.json) that peft.PeftModel.from_pretrained loads on the transformers model of the same base, where
    its layers' paths are theirs (models.CheckpointNames.module_path). rsLoRA's alpha is scale * sqrt(rank)."""
    kind = models.ADAPTER_KINDS[adapter_config["fine_tune_type"]]
    lora_layers = models.lora_layers(model)
    adapters = models.per_expert(model, {f"{path}.{name}": m[name] for path, m in lora_layers.items()
                                         for name in kind.weights})
    weights, layers = {}, set()
    for key, value in adapters.items():
        path, name = key.rsplit(".", 1)
        layers.add(model.args.names.module_path(path))
        names = PEFT_EMBEDDING_NAMES if isinstance(lora_layers.get(path), models.LoRAEmbedding) else kind.peft_names
        weights[f"base_model.model.{model.args.names.module_path(path)}.{names[name]}"] = value.T
    # a tied output layer shares the embedding's adapter: PEFT ties it so, and saves its lm_head's copy (tied_paths)
    tied = model.args.tie_word_embeddings and isinstance(lora_layers.get("model.embed_tokens"), models.LoRAEmbedding)
    if tied:
        embedding, head = lora_layers["model.embed_tokens"], model.args.names.module_path("lm_head")
        weights[f"base_model.model.{head}.lora_A.weight"] = embedding.lora_b
        weights[f"base_model.model.{head}.lora_B.weight"] = embedding.lora_a
    params = adapter_config["lora_parameters"]
    rslora = bool(params.get("use_rslora"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": params["rank"],
        "lora_alpha": params["scale"] * (math.sqrt(params["rank"]) if rslora else params["rank"]),
        "lora_dropout": params["dropout"], "use_rslora": rslora,
        # the exact layers, listed: PEFT matches a listed name as the whole path or its end, and converts
        # listed experts (experts.N.gate_proj) to transformers 5's stacked ones where it can (not a pattern's)
        "target_modules": sorted(layers),
        "bias": "none", "fan_in_fan_out": False, **kind.peft_config, "ensure_weight_tying": tied,
        "inference_mode": True,
    }

    def write(tmp):
        save_safetensors(tmp / "adapter_model.safetensors", weights, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))

    write_folder(Path(folder), write)


# Generation


def filtered_logits(logits: mx.array, temp: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0):
    """The logits divided by the temperature, those of the tokens that top-k, top-p (nucleus) and min-p leave out
    at -inf: in this order, each on what the one before left, as transformers' samplers (TRL's) do. (mlx-lm filters
    before the temperature.)"""
    logits = logits / temp
    if 0 < top_k < logits.shape[-1]:
        kth = mx.topk(logits, top_k, axis=-1).min(axis=-1, keepdims=True)
        logits = mx.where(logits < kth, -mx.inf, logits)
    if top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose probability reaches top_p (the first token always)
        outside = (mx.cumsum(probs, axis=-1) - probs) >= top_p
        logits = mx.put_along_axis(logits, order, mx.where(outside, -mx.inf, sorted_logits), axis=-1)
    if min_p > 0.0:
        probs = mx.softmax(logits, axis=-1)
        logits = mx.where(probs < min_p * probs.max(axis=-1, keepdims=True), -mx.inf, logits)
    return logits


def sample(logits: mx.array, temp: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, key=None):
    """A token for each row of logits: the likeliest if temp is 0, else drawn (with `key`, or MLX's global random
    state) from filtered_logits."""
    if temp == 0:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(filtered_logits(logits, temp, top_p, top_k, min_p), key=key)


class Completion(NamedTuple):
    """A generated sequence: its tokens, and why it ended: "eos" (its last token is an end-of-sequence one),
    "stop" (a stop string appeared: the tokens go on to the one that completed it; completion_text cuts the text
    before it) or "length" (max_tokens generated: truncated)."""
    tokens: list
    finish: str


def completion_text(completion: Completion, tokenizer, stop=None) -> str:
    """A completion's text, without its end-of-sequence token, cut before the first of the stop strings."""
    text = tokenizer.decode(completion.tokens[:-1] if completion.finish == "eos" else completion.tokens)
    return text[:min([text.find(s) for s in stop_strings(stop) if s in text], default=len(text))]


def stop_strings(stop) -> list:
    return [stop] if isinstance(stop, str) else list(stop or ())


def cache_rows(caches: list, rows: mx.array):
    """One layer's cache holding the rows `rows` of these caches of the layer (their rows one after another):
    each array of theirs (keys, values, states) joined along the batch, then those rows taken."""
    def take(arrays):
        return (mx.concatenate(arrays) if len(arrays) > 1 else arrays[0])[rows]

    merged = copy.copy(caches[0])
    for name, value in vars(merged).items():
        if isinstance(value, mx.array):
            setattr(merged, name, take([vars(c)[name] for c in caches]))
        elif isinstance(value, dict):
            setattr(merged, name, {k: take([vars(c)[name][k] for c in caches]) for k in value})
    return merged


def prefilled(model: models.Model, prompts: list):
    """(cache, logits): the model's caches after the prompts, left-padded to the longest (each row's positions
    start after its padding), and each one's next-token logits. Attention masks the pads, and rotary positions
    are relative. Where layers carry a state (Family.carries_state), which would read the pads, the prompts of
    one length go through the model together, unpadded, each cache started at the padding's length
    (KVCache.update); else all at once, padded. A prompt given more than once (a group of completions) goes
    through once."""
    width = max(map(len, prompts))
    by_length = {}
    for prompt in dict.fromkeys(map(tuple, prompts)):
        by_length.setdefault(len(prompt) if model.args.family.carries_state else width, []).append(prompt)
    caches, logits, order = [], [], []
    for length, group in by_length.items():
        cache = model.make_cache()
        for layer_cache in cache:
            layer_cache.offset = width - length
        examples = [[-1] * (width - len(prompt)) + [0] * len(prompt) for prompt in group]
        padding = {"examples": mx.array(examples)} if min(map(len, group)) < width else None
        tokens = mx.array([[0] * (length - len(prompt)) + list(prompt) for prompt in group])
        # the last position's logits alone: a long prompt's would take its length times the vocabulary
        logits.append(model.logits(model.hidden_states(tokens, cache, padding)[:, -1]))
        caches.append(cache)
        order += group
    row = {prompt: i for i, prompt in enumerate(order)}
    rows = mx.array([row[tuple(prompt)] for prompt in prompts])
    cache = [cache_rows(list(layer_caches), rows) for layer_caches in zip(*caches)]
    return cache, mx.concatenate(logits)[rows]


def generate_batch(model: models.Model, prompts: list, max_tokens, *, temp=0.0, top_p=1.0, top_k=0, min_p=0.0,
                   eos_ids=(), stop=None, tokenizer=None, seed=None, on_token=None) -> list:
    """A Completion of each prompt (token ids; of different lengths), generated together: one pass of the model
    for each new token of every row, on the model as it is (adapters applied, quantized or not), with a cache.
    Each row ends at its first token in eos_ids (kept), once its text holds a stop string (`stop`: one or a
    list; needs the tokenizer) or after max_tokens (a number, or one per prompt; 0 generates none). Sampling:
    `sample`, from mx.random.key(seed) if a seed is given (the same completions again), from each row's own
    mx.random.key if seed is a list of one per prompt (a row's completion then depends on its prompt and seed
    alone, not on the others in the batch), else from MLX's global random state. on_token(row, token) is called
    with each token as it comes. Finished rows leave the batch.
    Logits that are not finite are an error: a token picked from them would be noise."""
    if not prompts:
        return []
    stops = stop_strings(stop)
    if stops and tokenizer is None:
        raise ValueError("stop strings need the tokenizer")
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    eos_ids = set(eos_ids)
    rows_seeded = isinstance(seed, (list, tuple))
    key = (None if seed is None else mx.stack([mx.random.key(s) for s in seed]) if rows_seeded
           else mx.random.key(seed))

    def next_token(logits):
        """Each row's next token, and whether its logits are finite, computing while the caller goes on."""
        nonlocal key
        logits = logits.astype(mx.float32)
        if rows_seeded:
            key, subkeys = mx.split(mx.vmap(mx.random.split)(key), 2, axis=1)
            key = key[:, 0]
            token = (mx.argmax(logits, axis=-1) if temp == 0 else mx.vmap(lambda row, k: mx.random.categorical(row, key=k))(
                filtered_logits(logits, temp, top_p, top_k, min_p), subkeys[:, 0]))
        else:
            subkey = None
            if key is not None:
                key, subkey = mx.random.split(key)
            token = sample(logits, temp, top_p, top_k, min_p, subkey)
        finite = mx.isfinite(logits).all(axis=-1)
        mx.async_eval(token, finite)
        return token, finite

    cache, logits = prefilled(model, prompts)
    token, finite = next_token(logits)
    width = max(map(len, prompts))
    # each position of each row: -1 where padding, which attention leaves out
    examples = mx.array([[-1] * (width - len(p)) + [0] * len(p) for p in prompts])
    completions, finish = [[] for _ in prompts], [None] * len(prompts)
    live = list(range(len(prompts)))  # the rows of the batch: those not finished
    for n in itertools.count(1):
        if any(limits[row] > n for row in live):  # the next step goes on while this one's tokens are read
            examples = mx.concatenate([examples, mx.zeros((len(live), 1), examples.dtype)], axis=1)
            hidden = model.hidden_states(token[:, None], cache, {"examples": examples})
            following = next_token(model.logits(hidden[:, -1]))
        if not finite.all().item():
            raise UserError(f"the model's output (its logits) for token {n} of the generation is not finite")
        for row, value in zip(live, token.tolist()):
            if limits[row] == 0:
                finish[row] = "length"
                continue
            completions[row].append(value)
            if on_token is not None:
                on_token(row, value)
            if value in eos_ids:
                finish[row] = "eos"
            elif stops and any(s in tokenizer.decode(completions[row]) for s in stops):
                finish[row] = "stop"
            elif len(completions[row]) == limits[row]:
                finish[row] = "length"
        kept = [k for k, row in enumerate(live) if finish[row] is None]
        if not kept:
            return [Completion(tokens, reason) for tokens, reason in zip(completions, finish)]
        token, finite = following
        if len(kept) < len(live):  # finished rows leave the batch
            rows = mx.array(kept)
            cache = [cache_rows([layer_cache], rows) for layer_cache in cache]
            token, finite, examples = token[rows], finite[rows], examples[rows]
            key = key[rows] if rows_seeded else key
            live = [live[k] for k in kept]
