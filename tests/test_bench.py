"""benchmarks/bench.py as a user runs it: one JSON line on stdout, its numbers consistent with the batches."""
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT, random_checkpoint
from transformers import AutoTokenizer

import lora
from utils import UserError


def bench(*flags):
    """bench.py's JSON line (it inherits the tests' OpenBLAS environment, so it does not re-execute)."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), *map(str, flags)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 1, run.stdout  # progress goes to stderr
    result = json.loads(lines[0])
    assert math.isfinite(result["final_loss"])
    assert math.isclose(result["tokens_per_second"] * result["seconds"], result["trained_tokens"], rel_tol=1e-6)
    assert math.isclose(result["steps_per_second"] * result["seconds"], result["steps"], rel_tol=1e-6)
    return result


def test_data(tiny_llama, data_dir):
    result = bench("--model", tiny_llama, "--data", data_dir, "--lora-layers", 2, "--lora-rank", 4,
                   "--warmup-steps", 2, "--steps", 3, "--peak-tflops", 1)
    # the targets that count (not padding) of the batches after the warm-up's, as lora.py draws them
    dataset = lora.tokenize(lora.load_dataset(data_dir, "train"), AutoTokenizer.from_pretrained(tiny_llama), 1,
                            2048, "train")
    batches = lora.iterate_batches(dataset, 4, train=True, seed=0)
    timed = [next(batches) for _ in range(5)][2:]
    assert result["trained_tokens"] == sum(batch.scored.sum().item() for batch in timed)
    assert (result["model"], result["shape"]) == (str(tiny_llama), None)
    assert (result["batch_size"], result["num_layers"]) == (4, 2)
    assert result["lora_parameters"]["rank"] == 4 and result["trainable_parameters"] > 0
    assert result["peak_memory_gb"] > 0 and result["device"].startswith(("cpu", "gpu"))
    assert result["quantization"] is None
    floor = result["floor"]
    assert floor["flops_per_token"] > 0
    assert math.isclose(floor["tokens_per_second"], 1e12 / floor["flops_per_token"])
    # layers 0-1 computed once, up front: over the 1000 steps of a whole run, slower than a step alone
    assert result["frozen_prefix"]["layers"] == 2 and result["frozen_prefix"]["gb"] > 0
    assert result["run_tokens_per_second"] < result["tokens_per_second"]
    uncached = bench("--model", tiny_llama, "--data", data_dir, "--lora-layers", 2, "--lora-rank", 4,
                     "--warmup-steps", 2, "--steps", 3, "--peak-tflops", 1, "--no-cache-frozen-layers")
    assert uncached["frozen_prefix"] is None and uncached["trained_tokens"] == result["trained_tokens"]
    assert uncached["floor"]["flops_per_token"] > floor["flops_per_token"]


def test_shape_synthetic_quantized():
    """A named shape's random model, quantized in memory, on full rows of random tokens."""
    result = bench("--shape", "smollm2-135m", "-q", "--seq-length", 16, "--batch-size", 2, "--warmup-steps", 1,
                   "--steps", 2)
    assert result["trained_tokens"] == 2 * 2 * 15  # a row of 16 tokens has 15 targets
    assert (result["shape"], result["model"], result["data"]) == ("smollm2-135m", None, None)
    assert result["quantization"] == ["4-bit, group size 64", "8-bit, group size 64"]  # embedding 8-bit
    assert result["floor"]["tokens_per_second"] is None


def test_tokenizer_must_fit(tokenizer_dir):
    """--tokenizer's ids must be the model's: a larger vocabulary is a one-line error, not an index error later."""
    with pytest.raises(UserError, match="300 tokens, more than the model's vocabulary"):
        random_checkpoint.fitting_tokenizer(tokenizer_dir, 256)


def test_under_mlx_launch(tiny_llama, data_dir):
    """Two ranks of the same recipe: one line, from rank 0, with the tokens of both ranks' shares."""
    from test_distributed import LAUNCH, free_ports

    if LAUNCH is None:
        pytest.skip("mlx.launch (MLX's launcher) is not installed")
    flags = ["--model", tiny_llama, "--data", data_dir, "--lora-layers", 2, "--lora-rank", 4, "--warmup-steps", 2,
             "--steps", 3, "--no-cache-frozen-layers"]
    run = subprocess.run([LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_ports()), "--",
                          sys.executable, str(ROOT / "benchmarks" / "bench.py"), *map(str, flags)],
                         capture_output=True, text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert len(lines) == 1, run.stdout + run.stderr
    result = json.loads(lines[0])
    assert result["ranks"] == 2 and result["trained_tokens"] == bench(*flags)["trained_tokens"]
    assert math.isclose(result["tokens_per_second_per_rank"] * 2, result["tokens_per_second"])


def test_wallclock_times_whole_runs(tiny_llama, data_dir, tmp_path):
    """benchmarks/wallclock.py: each run's wall time, the ratio to the anchor, and lora.py's parts, which fit in
    its wall time. The anchor runs in the environment wallclock.py was given, not in lora.py's (a preloaded
    BLAS, MLX's buffer size: they had reached mlx-lm and PEFT)."""
    seen = tmp_path / "anchor_environment.json"
    record = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w')); os.execv(sys.executable, sys.argv[2:])"
    anchor = (f"{sys.executable} -c \"{record}\" {seen} {sys.executable} {ROOT / 'lora.py'} --model {{model}} "
              f"--data {{data}} --train --iters {{iters}} "
              f"--batch-size {{batch_size}} --val-batches 0 --lora-layers 2 "
              f"--adapter-file {tmp_path / 'anchor' / 'a.safetensors'}")
    # A shell's environment: without the mark of the scripts' own set-up (conftest re-executed pytest in it),
    # and without what C libraries set behind os.environ (readline: LINES, COLUMNS)
    shell = {k: v for k, v in os.environ.items() if k != "LORA_CPU_ENVIRONMENT"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "wallclock.py"), "--model", str(tiny_llama),
                          "--data", str(data_dir), "--iters", "3", "--repeats", "2", "--logs", str(tmp_path / "logs"),
                          "--anchor", anchor, "--", "--lora-layers", "2"], capture_output=True, text=True, timeout=600,
                         env=shell)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert [len(result["runs"][k]) for k in ("lora.py", "anchor")] == [2, 2]
    ours = result["runs"]["lora.py"]
    assert all(r["seconds"] > 0 and r["peak_memory_gb"] is not None and r["max_rss_gb"] > 0 for r in ours)
    assert math.isclose(result["anchor_over_ours"],
                        result["median_seconds"]["anchor"] / result["median_seconds"]["lora.py"])
    parts = result["lora_parts_median_seconds"]
    assert {"loading", "steps"} <= set(parts) and sum(parts.values()) < result["median_seconds"]["lora.py"]
    assert (tmp_path / "logs" / "lora.py-1.log").read_text().count("Seconds: ") == 1
    assert json.loads(seen.read_text()) == shell

def test_wallclock_names_a_failed_runs_exit_status(tmp_path):
    """A run that fails stops wallclock.py with one line: its exit status (not the raw wait status, 256 for 1)."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "wallclock.py"), "--model", str(tmp_path / "none"),
                          "--data", str(tmp_path), "--iters", "1", "--repeats", "1", "--logs", str(tmp_path / "logs")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("wallclock.py: error: ") and "failed (exit status 1); its output is in" in run.stderr



def test_mlx_lm_lora_grpo_anchor(tiny_llama):
    """benchmarks/mlxlm_lora_grpo.sh, the GRPO anchor: mlx-lm-lora trains adapters on lora.py's targets alone
    (q_proj and v_proj: it would adapt every linear layer) and prints the peak that wallclock.py reads; a batch of
    completions that the group does not divide, or a group of 0, is a one-line error."""
    pytest.importorskip("mlx_lm_lora")
    import wallclock

    def anchor(batch_size, group):
        return subprocess.run(["bash", str(ROOT / "benchmarks" / "mlxlm_lora_grpo.sh"), str(tiny_llama),
                               str(ROOT / "data" / "grpo"), "2", str(batch_size), str(group), "8"],
                              capture_output=True, text=True, timeout=300)

    run = anchor(4, 2)
    assert run.returncode == 0, run.stdout + run.stderr
    assert wallclock.mlx_peak(run.stdout) > 0
    # rank 8 on 4 layers' q_proj (64 -> 64) and v_proj (64 -> 32): 4 * (8 * (64 + 64) + 8 * (64 + 32)) = 7168
    assert "(0.007M/" in run.stdout, run.stdout
    for batch_size, group, error in [(5, 2, "BATCH_SIZE 5 must be a multiple of GROUP 2"),
                                     (4, 0, "GROUP must be a positive integer, not '0'")]:
        wrong = anchor(batch_size, group)
        assert (wrong.returncode, wrong.stdout) == (2, "") and wrong.stderr.count("\n") == 1
        assert wrong.stderr.startswith(f"mlxlm_lora_grpo.sh: error: {error}")


@pytest.mark.parametrize("shape", ["qwen3.5-9b", "qwen3.5-35b-a3b"])
def test_qwen3_5_shapes_load_here_and_in_mlx_lm(shape, tmp_path, monkeypatch):
    """The Qwen3.5 shapes, shrunk, written quantized (as for the H200's measurements): we load them, and so does
    mlx-lm (for the comparison), to the same logits."""
    import mlx.core as mx
    import mlx_lm
    import numpy as np

    import utils

    text = dict(random_checkpoint.SHAPES[shape]["text_config"], hidden_size=128, intermediate_size=256,
                num_hidden_layers=4, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=32, linear_value_head_dim=32, vocab_size=4096)
    if "num_experts" in text:
        text.update(num_experts=8, moe_intermediate_size=64, shared_expert_intermediate_size=64)
    monkeypatch.setitem(random_checkpoint.SHAPES, "tiny", dict(random_checkpoint.SHAPES[shape], text_config=text))
    random_checkpoint.write(tmp_path / "tiny", "tiny", dtype="float32", quantize=True)
    model, tokenizer, _ = utils.load(str(tmp_path / "tiny"))
    tokens = mx.array([tokenizer.encode("SELECT name FROM t WHERE year = 7")])
    assert np.abs(np.array(model(tokens) - mlx_lm.load(str(tmp_path / "tiny"))[0](tokens))).max() < 1e-4


@pytest.mark.parametrize("trainer", ["lora.py", "mlx-lm"])
def test_longest_reads_each_trainers_report(trainer, tiny_llama, tmp_path):
    """benchmarks/longest.py probes a trainer on one example of the length asked for, reading the peak and the
    speed from the trainer's own report."""
    pytest.importorskip("mlx_lm")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "longest.py"), "--model", str(tiny_llama),
                          "--num-layers", "2", "--start", "32", "--max-length", "32", "--logs", str(tmp_path),
                          *(["--mlx-lm"] if trainer == "mlx-lm" else [])], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr + run.stdout
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["trainer"] == trainer and (result["longest"], result["shortest_over_budget"]) == (32, None)
    probe = result["probes"]["32"]
    assert probe["peak_memory_gb"] >= 0 and probe["tokens_per_second"] > 0


def test_longest_searches_the_budget(tiny_llama, monkeypatch, capsys):
    """Lengths double from --start until a peak passes the budget, then --bisect probes halve the gap (to a
    multiple of 256)."""
    import longest

    def probe(command, log):  # a peak of 1 GB per 4096 tokens
        length = int(command[command.index("--max-seq-length") + 1])
        return {"peak_memory_gb": length / 4096, "tokens_per_second": 1.0, "seconds": 0.0}

    monkeypatch.setattr(longest, "probe", probe)
    monkeypatch.setattr(sys, "argv", ["longest.py", "--model", str(tiny_llama), "--start", "4096", "--budget-gb", "5",
                                      "--bisect", "2"])
    longest.main()
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    # 4096, 8192, 16384 (4 GB), 32768 (8 GB: over); then 24576 (over), 20480 (5 GB: fits)
    assert list(map(int, result["probes"])) == [4096, 8192, 16384, 20480, 24576, 32768]
    assert (result["longest"], result["shortest_over_budget"]) == (20480, 24576)


def test_longest_names_a_model_it_cannot_read(tmp_path):
    """A --model without a tokenizer stops longest.py with one line naming the flag and the folder."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "longest.py"), "--model", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith(f"longest.py: error: --model: {tmp_path / 'none'}: cannot load its tokenizer")
