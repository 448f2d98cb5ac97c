"""Each training mode on the same questions, as a user runs it: `lora.py --train --train-mode MODE` for --iters,
then the held-out pairs of data/preference/test.jsonl scored before training and after each mode. The score that
every mode can be read by is `--test --train-mode cpo`'s rewards/accuracies: the share of test pairs whose chosen
SQL the model makes more likely than the rejected one. `--test --train-mode dpo` adds the same share for the
change from the base model (DPO's implicit reward). Prints one JSON line per mode; progress goes to stderr.

    python benchmarks/objectives.py --model M [--iters 100] [--learning-rate 1e-4] [--out /tmp/objectives]
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = {"sft": "data", "kto": "data/kto"}  # the other modes train and test on data/preference


def lora(*flags):
    """lora.py's stdout, its stderr passed through (the progress bar)."""
    done = subprocess.run([sys.executable, str(ROOT / "lora.py"), *map(str, flags)], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True)
    if done.returncode:
        sys.exit(f"lora.py {' '.join(map(str, flags))} failed:\n{done.stdout}")
    return done.stdout


def test_metrics(model, adapter_file, mode, data="data/preference"):
    """--test's line read as {name: number}, in MODE's terms."""
    line = next(line for line in lora("--model", model, "--adapter-file", adapter_file, "--test", "--data", data,
                                      "--train-mode", mode).splitlines() if line.startswith("Test loss"))
    return {name: float(value) for name, value in re.findall(r"([\w/]+) (-?\d+(?:\.\d+)?(?:e-?\d+)?)", line)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--modes", default="sft,dpo,orpo,kto,simpo,cpo")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("/tmp/objectives"))
    args = p.parse_args()
    recipe = ["--batch-size", args.batch_size, "--val-batches", 0, "--steps-per-report", 10]

    # the base model as adapters: one step at a learning rate of 1e-30 (0 is refused) leaves them at 1e-30 of
    # the weights, which no float32 sum sees
    base = args.out / "base" / "adapters.safetensors"
    lora("--model", args.model, "--train", "--data", "data/preference", "--train-mode", "cpo", "--iters", 1,
         "--learning-rate", 1e-30, "--adapter-file", base, *recipe)
    print(json.dumps({"mode": "base", "accuracy": test_metrics(args.model, base, "cpo")["rewards/accuracies"]}),
          flush=True)

    for mode in args.modes.split(","):
        adapters = args.out / mode / "adapters.safetensors"
        start = time.perf_counter()
        lora("--model", args.model, "--train", "--data", DATA.get(mode, "data/preference"), "--train-mode", mode,
             "--iters", args.iters, "--learning-rate", args.learning_rate, "--adapter-file", adapters, *recipe)
        seconds = time.perf_counter() - start
        runs = sorted((args.out / mode / "runs").iterdir(), key=lambda p: int(p.name))
        reports = [json.loads(line) for line in (runs[-1] / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in reports if "iterations_per_second" in r][1:]  # the first report holds the compile
        print(json.dumps({
            "mode": mode, "accuracy": test_metrics(args.model, adapters, "cpo")["rewards/accuracies"],
            "accuracy_against_base": test_metrics(args.model, adapters, "dpo")["rewards/accuracies"],
            "own_test": test_metrics(args.model, adapters, mode, DATA.get(mode, "data/preference")),
            "run_seconds": seconds,
            "steps_per_second": statistics.median(r["iterations_per_second"] for r in steps),
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steps),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in steps)}), flush=True)


if __name__ == "__main__":
    main()
