"""Whole fine-tuning runs, timed as a user times them: from the command's start to its end, the adapters on
disk. Runs `lora.py --train` and, if given, an anchor command (mlx-lm's, say) one right after the other,
--repeats times, and prints a table and one JSON line: the median wall time of each, their ratio, the peak
memory (MLX's, from each command's own report, and the process's resident set), and the median of each
part of lora.py's run (its closing "Seconds:" line: loading, tokenizing, the frozen layers' pass, the
first step, the steps, validation, saving).

    python benchmarks/wallclock.py --model M --data D --iters 1000 --batch-size 4 --repeats 3 \\
        --anchor "bash ../shared/bench/mlxlm_lora.sh {model} {data} {iters} 16 {batch_size}" -- --pack

Flags after -- go to lora.py. The anchor's {model}, {data}, {iters} and {batch_size} are filled in.
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402


def timed(command, log):
    """(wall seconds, largest resident set in GB, output) of a command, its output also written to `log`."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    text = Path(log).read_text()
    if status:
        raise utils.UserError(f"{shlex.join(command)} failed (exit status {os.waitstatus_to_exitcode(status)}); "
                              f"its output is in {log}")
    return seconds, usage.ru_maxrss / 1e6, text


def mlx_peak(text):
    """The last peak memory a command reported: lora.py's and mlx-lm's "Peak mem X GB", or PEAK_MEM_GB X."""
    found = re.findall(r"(?:Peak mem|PEAK_MEM_GB) ([\d.]+)", text)
    return float(found[-1]) if found else None


def build_parser():
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--iters", type=utils.POSITIVE_INT, default=1000)
    p.add_argument("--batch-size", type=utils.POSITIVE_INT, default=4)
    p.add_argument("--repeats", type=utils.POSITIVE_INT, default=3)
    p.add_argument("--anchor", help="The command to time beside lora.py ({model}, {data}, {iters}, {batch_size}).")
    p.add_argument("--logs", help="Folder for each run's output (default: a new temporary one).")
    p.add_argument("lora_flags", nargs=argparse.REMAINDER, help="-- then more lora.py flags.")
    return p


def main():
    args = build_parser().parse_args()
    logs = Path(args.logs or tempfile.mkdtemp(prefix="wallclock-"))
    logs.mkdir(parents=True, exist_ok=True)
    extra = args.lora_flags[1:] if args.lora_flags[:1] == ["--"] else args.lora_flags
    ours = [sys.executable, str(ROOT / "lora.py"), "--model", args.model, "--data", args.data, "--train",
            "--iters", str(args.iters), "--batch-size", str(args.batch_size), "--val-batches", "0",
            "--save-every", str(args.iters), "--adapter-file", str(logs / "adapters" / "adapters.safetensors"), *extra]
    anchor = args.anchor and shlex.split(args.anchor.format(model=args.model, data=args.data, iters=args.iters,
                                                             batch_size=args.batch_size))
    runs = {"lora.py": [], "anchor": []}
    parts = []
    for r in range(args.repeats):
        for name, command in (("lora.py", ours), ("anchor", anchor)):
            if not command:
                continue
            seconds, rss, text = timed(command, logs / f"{name}-{r}.log")
            runs[name].append({"seconds": seconds, "peak_memory_gb": mlx_peak(text), "max_rss_gb": rss})
            if name == "lora.py":
                line = re.findall(r"Seconds: (.*)", text)[-1]
                parts.append({k: float(v) for k, v in (item.rsplit(" ", 1) for item in line.split(", "))})
            print(f"run {r + 1} {name}: {seconds:.1f} s, MLX peak {runs[name][-1]['peak_memory_gb']} GB, "
                  f"resident {rss:.1f} GB", file=sys.stderr, flush=True)
    median = {name: statistics.median(run["seconds"] for run in v) for name, v in runs.items() if v}
    result = {"model": args.model, "iters": args.iters, "batch_size": args.batch_size, "lora_flags": extra,
              "anchor": args.anchor, "runs": runs, "median_seconds": median,
              "anchor_over_ours": median["anchor"] / median["lora.py"] if "anchor" in median else None,
              "lora_parts_median_seconds": {k: statistics.median(p.get(k, 0.0) for p in parts)
                                            for k in dict.fromkeys(k for p in parts for k in p)}}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    # No utils.set_up_process() here: what it sets (MLX_MAX_MB_PER_BUFFER on a GPU, a preloaded BLAS on the
    # CPU) would reach the anchor too, which must run as its users run it; lora.py sets its own
    utils.run_main("wallclock.py", main)
