"""The longest single example a recipe trains on within a memory budget: lora.py's trainer, or with --mlx-lm
mlx-lm's on the same recipe (LoRA rank 8, scale 20 on q_proj and v_proj of the last --num-layers layers), trained for three
steps at batch 1 on one example of L tokens. L doubles from --start while MLX's peak memory (the trainer's own
report) stays within --budget-gb, then --bisect probes halve the gap between the longest that fit and the
shortest that did not. Prints each probe (length, peak memory, tokens/s of the steps after the first, seconds)
and one JSON line.

    python benchmarks/longest.py --model M --budget-gb 24 --mlx-lm -- --grad-checkpoint
    python benchmarks/longest.py --model M --start 16384 --max-length 16384 -- --grad-checkpoint  # one length

Flags after -- go to the trainer (both have --grad-checkpoint). The example is the data set's text repeated.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402

TARGETS, RANK, SCALE = ["self_attn.q_proj", "self_attn.v_proj"], 8, 20.0
# mlx_lm.lora with its report in lora.py's words: mlx-lm prints neither the peak memory nor exact tokens/s
MLX_LM = """import sys
import mlx_lm.lora as lora
from mlx_lm.tuner.trainer import TrainingCallback

class Report(TrainingCallback):
    def on_train_loss_report(self, info):
        print(f"Iter {info['iteration']}: Tokens/sec {info['tokens_per_second']:.1f}, "
              f"Peak mem {info['peak_memory']:.2f} GB", flush=True)

lora.get_reporting_callbacks = lambda *args, **kwargs: Report()
sys.argv = ["mlx_lm.lora", *sys.argv[1:]]
lora.main()
"""


def long_example(texts, tokenizer, length: int, folder: Path):
    """A data folder whose train.jsonl holds one text of at least `length` tokens (the texts repeated), and whose
    valid.jsonl (which mlx-lm requires) holds the first text."""
    joined = " ".join(texts)
    repeats = -(-(length + 1) // len(tokenizer.encode(joined))) + 1  # +1: tokens may merge across the joins
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text(json.dumps({"text": " ".join([joined] * repeats)}) + "\n")
    (folder / "valid.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")
    return folder


def command(args, data: Path, length: int, work: Path) -> list:
    """The trainer's command, training three steps on `data` cut to `length` tokens."""
    both = ["--model", args.model, "--data", str(data), "--train", "--iters", "3", "--batch-size", "1",
            "--max-seq-length", str(length), "--steps-per-report", "1", *args.flags]
    if not args.mlx_lm:
        return [sys.executable, str(ROOT / "lora.py"), *both, "--lora-layers", str(args.num_layers), "--lora-rank", str(RANK),
                "--lora-scale", str(SCALE), "--lora-targets", *TARGETS, "--val-batches", "0",
                "--adapter-file", str(work / "adapters" / "adapters.safetensors")]
    config = work / "mlx_lm.yaml"
    config.write_text(json.dumps({"lora_parameters": {"keys": TARGETS, "rank": RANK, "scale": SCALE,
                                                      "dropout": 0.0}}))  # JSON is YAML
    return [sys.executable, "-c", MLX_LM, *both, "-c", str(config), "--num-layers", str(args.num_layers),
            "--steps-per-eval", "100000", "--val-batches", "1", "--save-every", "100000",
            "--adapter-path", str(work / "adapters")]


def probe(command, log: Path) -> dict:
    """Peak memory (GB), tokens/s of the steps after the first, and the seconds the whole run took; a failed run
    (out of memory, say) has no peak. lora.py's tokens/s is its trained tokens after the first step over its
    closing "Seconds:" line's steps (its per-report speeds are of windows that pipelining shifts by up to a
    step); mlx-lm's is its last step's, which it times alone."""
    start = time.perf_counter()
    done = subprocess.run(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    text = log.read_text()
    peaks = re.findall(r"Peak mem ([\d.]+) GB", text)
    if done.returncode or not peaks:
        return {"peak_memory_gb": None, "tokens_per_second": None, "seconds": time.perf_counter() - start,
                "failed": f"exit status {done.returncode}, output in {log}"}
    trained, steps = re.findall(r"Trained tokens (\d+)", text), re.search(r"Seconds:.* steps ([\d.]+)", text)
    speed = ((int(trained[-1]) - int(trained[0])) / float(steps[1]) if steps
             else float(re.findall(r"Tokens/sec ([\d.]+)", text)[-1]))
    return {"peak_memory_gb": float(peaks[-1]), "tokens_per_second": round(speed, 1),
            "seconds": round(time.perf_counter() - start, 1)}


def build_parser():
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=str(ROOT / "data"), help="Its train.jsonl's texts make the long example.")
    p.add_argument("--num-layers", type=utils.POSITIVE_INT, default=16, help="Layers adapted (the last ones).")
    p.add_argument("--budget-gb", type=utils.POSITIVE, default=24.0)
    p.add_argument("--start", type=utils.POSITIVE_INT, default=4096, help="The first length probed.")
    p.add_argument("--max-length", type=utils.POSITIVE_INT, default=262144, help="No probe beyond it.")
    p.add_argument("--bisect", type=utils.NON_NEGATIVE_INT, default=2)
    p.add_argument("--mlx-lm", action="store_true", help="Probe mlx-lm's trainer instead of lora.py's.")
    p.add_argument("--logs", help="Folder for each probe's output (default: a new temporary one).")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then flags for both trainers.")
    return p


def main():
    args = build_parser().parse_args()
    args.flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    with utils.naming_flag("--model"):
        tokenizer = utils.read_tokenizer(Path(args.model))
    texts = [json.loads(line)["text"] for line in (Path(args.data) / "train.jsonl").open()]
    work = Path(args.logs or tempfile.mkdtemp(prefix="longest-"))
    work.mkdir(parents=True, exist_ok=True)
    trainer, probes = "mlx-lm" if args.mlx_lm else "lora.py", {}

    def fits(length):
        data = long_example(texts, tokenizer, length, work / f"data-{length}")
        probes[length] = probe(command(args, data, length, work), work / f"{trainer}-{length}.log")
        print(f"{trainer}, {length} tokens: {json.dumps(probes[length])}", flush=True)
        return probes[length]["peak_memory_gb"] is not None and probes[length]["peak_memory_gb"] <= args.budget_gb

    longest, over, length = None, None, args.start
    while length <= args.max_length:
        if not fits(length):
            over = length
            break
        longest, length = length, 2 * length
    for _ in range(args.bisect if longest and over else 0):
        middle = (longest + over) // 2 // 256 * 256
        if middle in (longest, over):
            break
        longest, over = (middle, over) if fits(middle) else (longest, middle)
    print(json.dumps({"trainer": trainer, "model": args.model, "budget_gb": args.budget_gb, "flags": args.flags,
                      "longest": longest, "shortest_over_budget": over, "probes": dict(sorted(probes.items()))}))


if __name__ == "__main__":
    utils.run_main("longest.py", main)
