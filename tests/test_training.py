"""Optimisation flags (optimizer, schedule, warmup, accumulation, clipping) and --config."""
import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_lora

import lora
from utils import UserError

COMMON = ["--batch-size", 4, "--lora-layers", -1, "--lora-rank", 4, "--lora-alpha", 8, "--steps-per-eval", 1000,
          "--val-batches", 1]


def schedule_of(*flags):
    args = lora.build_parser().parse_args(["--learning-rate", "1e-3", "--iters", "20", *map(str, flags)])
    schedule = lora.learning_rate_schedule(args)
    return np.array([float(schedule(mx.array(step))) for step in range(21)])


def test_learning_rate_schedules():
    assert np.allclose(schedule_of(), 1e-3)
    warm = schedule_of("--warmup", 5)
    assert np.allclose(warm[:6], np.linspace(0, 1e-3, 6)) and np.allclose(warm[5:], 1e-3)
    assert np.allclose(schedule_of("--lr-schedule", "linear"), np.linspace(1e-3, 0, 21))
    cosine = schedule_of("--lr-schedule", "cosine", "--warmup", 5)
    assert np.allclose(cosine[5:], 1e-3 * 0.5 * (1 + np.cos(np.pi * np.arange(16) / 15)), atol=1e-9)


def adapters_after(capsys, model, data, path, *flags):
    out = run_lora(capsys, "--model", model, "--data", data, "--train", *COMMON, "--adapter-file", path, *flags)
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}, out


def test_accumulation_equals_the_larger_batch(tiny_llama, data_dir, tmp_path, capsys):
    """2 batches of 4 accumulated make the update of one batch of 8 (the same examples: the same order)."""
    big, _ = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "big.safetensors", "--iters", 3,
                            "--batch-size", 8, "--learning-rate", 1e-3)
    accumulated, out = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "acc.safetensors", "--iters", 3,
                                      "--grad-accumulation-steps", 2, "--learning-rate", 1e-3)
    assert all(np.abs(big[k]).max() > 0 for k in big if k.endswith("lora_b"))
    assert all(np.allclose(big[k], accumulated[k], atol=1e-5) for k in big)
    single, _ = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "one.safetensors", "--iters", 3,
                               "--learning-rate", 1e-3)
    assert not all(np.allclose(big[k], single[k], atol=1e-5) for k in big)


def test_clipping_and_weight_decay(tiny_llama, data_dir, tmp_path, capsys):
    flags = ["--iters", 10, "--learning-rate", 1e-2]
    free, out = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "free.safetensors", *flags, "--optimizer", "adamw")
    assert re.search(r"Learning rate 1\.00e-02", out)
    # Adam divides by the gradient's size, but not below its epsilon: a gradient clipped to 1e-12 barely moves
    clipped, _ = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "clip.safetensors", *flags, "--max-grad-norm", 1e-12)
    b = [k for k in free if k.endswith("lora_b")]
    assert sum(np.abs(clipped[k]).sum() for k in b) < 0.01 * sum(np.abs(free[k]).sum() for k in b)
    decayed, _ = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "wd.safetensors", *flags,
                                "--optimizer", "adamw", "--weight-decay", 10)
    a = [k for k in free if k.endswith("lora_a")]
    assert sum(np.linalg.norm(decayed[k]) for k in a) < 0.7 * sum(np.linalg.norm(free[k]) for k in a)
    with pytest.raises(UserError, match="--weight-decay needs --optimizer adamw"):
        run_lora(capsys, "--model", tiny_llama, "--data", data_dir, "--train", "--weight-decay", 0.1)


def test_config_file(tiny_llama, data_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_llama}\ndata: {data_dir}\ntrain: true\niters: 4\nlora-layers: 2\n"
                      "lora_targets: [q_proj, mlp.down_proj]\nlearning_rate: 1.0e-3\nlr_schedule: linear\n"
                      f"steps_per_report: 2\nval_batches: 1\nadapter_file: {tmp_path / 'a.safetensors'}\n")
    out = run_lora(capsys, "--config", config, "--iters", 2)  # the command line wins
    assert "Iter 2: Train loss" in out and "Iter 4" not in out
    assert re.search(r"Learning rate 5\.00e-04", out)  # linear decay: half way at update 1 of 2
    saved = sorted(mx.load(str(tmp_path / "a.safetensors")))
    assert len(saved) == 8 and all(re.match(r"model\.layers\.[23]\.(self_attn\.q_proj|mlp\.down_proj)\.", k) for k in saved)

    config.write_text("lora_rnak: 4\n")
    with pytest.raises(UserError, match=rf"--config {re.escape(str(config))}: lora_rnak is not a flag of lora.py"):
        run_lora(capsys, "--config", config)
    config.write_text("lr_schedule: exponential\n")
    with pytest.raises(SystemExit):  # argparse's own one-line error, naming the flag and the choices
        run_lora(capsys, "--config", config)
    assert "--lr-schedule: invalid choice: 'exponential'" in capsys.readouterr().err


def test_grad_checkpoint_same_gradients_in_less_memory(make_checkpoint):
    """Attention on the CPU keeps a (heads x length x length) array per layer for the backward pass:
    recomputing the layers instead keeps only their inputs."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    import models
    import utils

    folder, _ = make_checkpoint("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=12,
                                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    model, _, _ = utils.load(str(folder))
    model.freeze()
    models.linear_to_lora_layers(model, ["q_proj", "v_proj"], -1, rank=4)
    for layer in utils.lora_layers(model).values():
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    tokens = mx.random.randint(3, 300, (4, 257))
    batch = (tokens[:, :-1], tokens[:, 1:], mx.zeros(4, mx.int32), mx.full(4, 256, mx.int32))
    loss_and_grad = nn.value_and_grad(model, lora.loss_fn)
    results, peaks = [], []
    for checkpoint in (False, True):
        model.grad_checkpoint = checkpoint
        mx.clear_cache()
        mx.reset_peak_memory()
        (loss, _), grads = loss_and_grad(model, *batch)
        mx.eval(loss, grads)
        peaks.append(mx.get_peak_memory())
        results.append((loss.item(), dict(tree_flatten(grads))))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    assert abs(loss - loss_checkpointed) < 1e-5
    assert all(np.allclose(grads[k], grads_checkpointed[k], atol=1e-5) for k in grads) and len(grads) == 48
    assert peaks[1] < 0.5 * peaks[0], peaks


def test_grad_checkpoint_flag_trains_alike(tiny_llama, data_dir, tmp_path, capsys):
    plain, _ = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "plain.safetensors", "--iters", 4,
                              "--learning-rate", 1e-3)
    checkpointed, _ = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "ckpt.safetensors", "--iters", 4,
                                     "--learning-rate", 1e-3, "--grad-checkpoint")
    assert all(np.allclose(plain[k], checkpointed[k], atol=1e-5) for k in plain)
