"""The CPU's fp32 matrix product through MLX with each BLAS that can serve it here, quiet and with one
competing CPU-bound process, as GFLOP/s: which BLAS lora.py should preload (utils.cpu_environment).

    python benchmarks/blas.py [--size 1024 2048 2048] [--repeats 10]

Each candidate runs in a process of its own (a BLAS is chosen when the process starts): MLX's bundled BLAS,
OpenBLAS (Debian's, apt-get install libopenblas0-pthread, or else pip's, pip install scipy-openblas32) with the
kernels it picks itself and with those set for it, and Intel's MKL from its pip wheel (pip install mkl).
"""
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402

PRODUCT = """
import json, sys, time
import mlx.core as mx
m, k, n, repeats = map(int, sys.argv[1:])
a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
mx.eval(a, b)
for _ in range(2):
    mx.eval(a @ b)
start = time.perf_counter()
for _ in range(repeats):
    mx.eval(a @ b)
print(json.dumps(2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9))
"""


def busy():
    while True:
        pass


def candidates():
    """(name, environment) of each BLAS found here."""
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    found = [("mlx (bundled)", base)]
    for name, library in utils.blas_libraries().items():
        found.append((name, dict(base, LD_PRELOAD=library)))
        if name == "openblas":  # this machine's OPENBLAS_CORETYPE, if it sets one, and what utils would set
            for core in {os.environ.get("OPENBLAS_CORETYPE"), *utils.blas_settings(name, library).values()} - {None}:
                found.append((f"openblas, OPENBLAS_CORETYPE={core}", dict(base, LD_PRELOAD=library,
                                                                          OPENBLAS_CORETYPE=core)))
    return found


def gflops(env, size, repeats):
    out = subprocess.run([sys.executable, "-c", PRODUCT, *map(str, size), str(repeats)], env=env,
                         capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else f"failed: {out.stderr.strip()[-200:]}"


def main():
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=utils.POSITIVE_INT, nargs=3, default=(1024, 2048, 2048), metavar=("M", "K", "N"))
    p.add_argument("--repeats", type=utils.POSITIVE_INT, default=10)
    args = p.parse_args()
    rows = []
    for name, env in candidates():
        quiet = gflops(env, args.size, args.repeats)
        competitor = multiprocessing.Process(target=busy, daemon=True)
        competitor.start()
        try:
            loaded = gflops(env, args.size, args.repeats)
        finally:
            competitor.terminate()
        rows.append({"blas": name, "quiet_gflops": quiet, "busy_gflops": loaded})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
