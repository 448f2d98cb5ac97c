"""Optimisation flags (optimizer, schedule, warmup, accumulation, clipping) and --config."""
import contextlib
import re
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import run_lora, val_losses
from mlx.utils import tree_flatten, tree_map

import lora
import models
from utils import UserError

COMMON = ["--batch-size", 4, "--lora-layers", -1, "--lora-rank", 4, "--lora-alpha", 8, "--eval-on-start",
          "--steps-per-eval", 1000,
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


def test_epochs_set_the_iterations_and_the_schedule(tiny_llama, data_dir, tmp_path, capsys):
    """--epochs 2 over 64 examples in batches of 4, 3 batches an update: 2 * 16 / 3, rounded up, 11 iterations,
    along which the cosine schedule decays to 0."""
    out = run_lora(capsys, "--model", tiny_llama, "--data", data_dir, "--train", *COMMON, "--epochs", 2,
                   "--grad-accumulation-steps", 3, "--lr-schedule", "cosine", "--learning-rate", 1e-3,
                   "--steps-per-report", 1, "--adapter-file", tmp_path / "a.safetensors")
    rates = [float(rate) for rate in re.findall(r"Learning rate ([\d.e+-]+)", out)]
    assert len(rates) == 11 and "Iter 11: Train loss" in out and "Training for 2 epochs: 11 iterations" in out
    assert rates[0] == pytest.approx(1e-3) and rates[-1] < 0.05 * rates[0]


def test_no_validation(tiny_llama, data_dir, tmp_path, capsys):
    """--val-batches 0 trains without valid.jsonl and validates nothing; validation needs the file."""
    (data_dir / "valid.jsonl").unlink()
    flags = ["--iters", 4, "--learning-rate", 1e-2, "--cache-frozen-layers"]
    silent, out = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "a.safetensors", *flags, "--val-batches", 0)
    assert "Val loss" not in out and "Iter 4: Train loss" in out
    assert not any("val_loss" in r for r in lora.read_metrics(tmp_path / "runs" / "1" / "metrics.jsonl"))
    with pytest.raises(UserError, match="valid.jsonl: no such file"):
        adapters_after(capsys, tiny_llama, data_dir, tmp_path / "b.safetensors", *flags)


def test_eta_leaves_out_the_first_steps_compiling(tiny_llama, data_dir, tmp_path, capsys, monkeypatch):
    """A first step slowed by 3 s (as compiling slows it) does not move the ETA of the steps after it."""
    make_step = lora.make_step

    def slow_first(*args, **kwargs):
        step, calls = make_step(*args, **kwargs), []

        def step_after_a_wait(*batch):
            if not calls:
                time.sleep(3)
            calls.append(True)
            return step(*batch)
        return step_after_a_wait

    monkeypatch.setattr(lora, "make_step", slow_first)
    _, out = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "a.safetensors", "--iters", 4,
                            "--steps-per-report", 2, "--val-batches", 0)
    assert int(re.search(r"Iter 2: .* ETA (\d+)s", out)[1]) <= 1  # counting the first step: at least 3 s


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
    with pytest.raises(UserError, match=rf"--config {re.escape(str(config))}: lr_schedule: --lr-schedule: must be "
                                        rf"one of constant, linear, cosine, not \"exponential\""):
        run_lora(capsys, "--config", config)


# mlx-lm's examples/lora_config.yaml, its sizes made tiny (and its commented-out schedule and optimizer settings
# on, with values lora.py does alike)
MLX_LM_CONFIG = """\
model: "{model}"
train: true
fine_tune_type: lora
training_mode: normal
optimizer: adamw
optimizer_config:
  adamw:
    weight_decay: 0.05
data: "{data}"
seed: 0
num_layers: 2
batch_size: 4
iters: 4
val_batches: 1
learning_rate: 1e-5
steps_per_report: 2
steps_per_eval: 200
resume_adapter_file: null
adapter_path: "{adapters}"
save_every: 100
test: true
test_batches: 1
max_seq_length: 2048
grad_checkpoint: false
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 4
  scale: 20.0
  dropout: 0.0
lr_schedule:
  name: cosine_decay
  warmup: 1
  warmup_init: 0
  arguments: [1e-3, 3, 0]
"""


def test_an_mlx_lm_config_runs(tiny_llama, data_dir, tmp_path, capsys):
    """mlx-lm's example config runs unchanged: its keys as the flags that do the same, the adapters and
    adapter_config.json in the adapter_path folder, as mlx-lm writes them."""
    config = tmp_path / "lora_config.yaml"
    config.write_text(MLX_LM_CONFIG.format(model=tiny_llama, data=data_dir, adapters=tmp_path / "adapters"))
    args = vars(lora.parse_args(["--config", str(config)]))
    assert {k: args[k] for k in ("lora_layers", "lora_rank", "lora_scale", "lora_targets", "optimizer", "weight_decay",
                                 "lr_schedule", "warmup", "learning_rate", "adapter_file", "train_mode")} == {
        "lora_layers": 2, "lora_rank": 4, "lora_scale": 20.0, "lora_targets": ["self_attn.q_proj", "self_attn.v_proj"],
        "optimizer": "adamw", "weight_decay": 0.05, "lr_schedule": "cosine", "warmup": 1, "learning_rate": 1e-3,
        "adapter_file": str(tmp_path / "adapters" / "adapters.safetensors"), "train_mode": "sft"}
    out = run_lora(capsys, "--config", config)
    assert "Iter 4: Train loss" in out and "Test loss" in out
    saved = mx.load(str(tmp_path / "adapters" / "adapters.safetensors"))
    assert sorted({k.rsplit(".", 1)[0] for k in saved}) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in (2, 3) for p in "qv"]
    assert all(v.shape[-1] == 4 or v.shape[0] == 4 for v in saved.values())  # rank 4
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()


def test_grad_checkpoint_same_gradients_in_less_memory(make_checkpoint):
    """Attention on the CPU keeps a (heads x length x length) array per layer for the backward pass:
    recomputing the layers instead keeps only their inputs."""

    import models
    import utils

    folder, _ = make_checkpoint("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=12,
                                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    model, _, _ = utils.load(str(folder))
    model.freeze()
    models.linear_to_lora_layers(model, ["q_proj", "v_proj"], -1, rank=4)
    for layer in models.lora_layers(model).values():
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    tokens = mx.random.randint(3, 300, (4, 257))
    batch = (tokens[:, :-1], tokens[:, 1:], mx.ones((4, 256), mx.bool_))
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


def test_accumulated_batches_take_their_memory_in_turn(make_checkpoint):
    """--grad-accumulation-steps 4 of 2 rows: the update and loss of one batch of 8, with the activations of 2
    rows at a time (the batches' gradients computed one after another, not side by side)."""
    import models
    import utils

    folder, _ = make_checkpoint("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=12,
                                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    rows = [(tokens, 0) for tokens in np.random.default_rng(0).integers(3, 300, (8, 257)).tolist()]
    results = []
    for accumulated in (1, 4):
        size = 8 // accumulated
        model, _, _ = utils.load(str(folder))
        model.freeze()
        mx.random.seed(0)
        models.linear_to_lora_layers(model, ["q_proj", "v_proj"], -1, rank=4)
        args = lora.training_args(lora.build_parser().parse_args([
            "--grad-accumulation-steps", str(accumulated), "--batch-size", str(size)]))
        step = lora.make_step(model, lora.build_optimizer(args), args)
        mx.clear_cache()
        mx.reset_peak_memory()
        loss = step(lora.make_batch(rows[i:i + size], False) for i in range(0, 8, size))[0].item()
        results.append((loss, mx.get_peak_memory(), dict(tree_flatten(model.trainable_parameters()))))
    (loss, peak, weights), (accumulated_loss, accumulated_peak, accumulated_weights) = results
    assert abs(loss - accumulated_loss) < 1e-5
    assert all(np.allclose(weights[k], accumulated_weights[k], atol=1e-6) for k in weights)
    assert accumulated_peak < 0.5 * peak, (accumulated_peak, peak)


def test_grad_checkpoint_flag_trains_alike(tiny_llama, data_dir, tmp_path, capsys):
    plain, _ = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "plain.safetensors", "--iters", 4,
                              "--learning-rate", 1e-3)
    checkpointed, _ = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "ckpt.safetensors", "--iters", 4,
                                     "--learning-rate", 1e-3, "--grad-checkpoint")
    assert all(np.allclose(plain[k], checkpointed[k], atol=1e-5) for k in plain)


def test_compiled_step_gives_the_same_loss_curve(tiny_llama, data_dir):
    import utils

    dataset = lora.tokenize(lora.load_dataset(data_dir, "train"), utils.load(str(tiny_llama))[1], 1, 2048, "train")
    args = lora.training_args(lora.build_parser().parse_args(["--learning-rate", "1e-2",
                                                              "--grad-accumulation-steps", "1"]))
    curves = []
    for compiled in (True, False):
        model = utils.load(str(tiny_llama))[0]
        model.freeze()
        mx.random.seed(0)
        lora.models.linear_to_lora_layers(model, ["q_proj", "v_proj"], -1, rank=4)
        step = lora.make_step(model, lora.build_optimizer(args), args, compiled=compiled)
        batches = lora.iterate_batches(dataset, 4, train=True)
        curves.append([step(batches)[0].item() for _ in range(8)])
    assert curves[0][-1] < curves[0][0] - 0.3
    assert np.allclose(*curves, atol=1e-4), curves


def test_padding_changes_neither_loss_nor_gradient(tiny_llama, data_dir):
    """Rows padded further (on a GPU to a multiple of 32 tokens, not 8, for fewer shapes to compile) give the
    same loss and gradient."""
    import utils

    model, tokenizer, _ = utils.load(str(tiny_llama))
    model.freeze()
    lora.models.linear_to_lora_layers(model, ["q_proj", "v_proj"], -1, rank=4)
    for layer in models.lora_layers(model).values():
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    dataset = lora.tokenize(lora.load_dataset(data_dir, "train"), tokenizer, 1, 2048, "train")
    loss_and_grad = nn.value_and_grad(model, lora.loss_fn)
    for i in range(0, 12, 4):
        batch = lora.make_batch(dataset[i:i + 4], False)
        assert batch[0].shape[1] % 8 == 0
        padded = [mx.pad(a, [(0, 0), (0, 32 - a.shape[1] % 32 + 24)]) for a in batch[:3]]
        (loss, count), grads = loss_and_grad(model, *batch)
        (padded_loss, padded_count), padded_grads = loss_and_grad(model, *padded)
        assert count.item() == padded_count.item() and abs(loss.item() - padded_loss.item()) < 1e-5
        for (name, g), (_, p) in zip(tree_flatten(grads), tree_flatten(padded_grads)):
            assert np.abs(np.array(g - p)).max() < 1e-5 * max(1, np.abs(np.array(g)).max()), name


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_packing_and_sorting_keep_each_tokens_loss(make_checkpoint, model_type, data_dir):
    """Packed rows (attention within each example, by a mask over the row or on the examples laid out as rows
    of their own) and length-sorted batches change the batches, not the loss of any token, nor the gradient.
    Mistral's sliding window (16 here) is shorter than the examples."""
    import utils

    path = make_checkpoint(model_type, sliding_window=16)[0] if model_type == "mistral" else make_checkpoint()[0]
    model, tokenizer, _ = utils.load(str(path))
    model.freeze()
    lora.models.linear_to_lora_layers(model, ["q_proj", "v_proj"], -1, rank=4)
    for layer in models.lora_layers(model).values():
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    dataset = lora.tokenize(lora.load_dataset(data_dir, "train"), tokenizer, 1, 2048, "train")[:12]
    # the longest of a batch a multiple of 8, and one filling its packed row but for the padding it must have
    dataset[1] = ((list(dataset[1][0]) + list(dataset[2][0]))[:33], 0)
    total = sum(len(t) - 1 for t, _ in dataset[4:8])
    dataset[4] = (dataset[4][0][:len(dataset[4][0]) - (total + 1) % 16], 0)
    assert max(len(t) - 1 for t, _ in dataset[:4]) == 32 and (sum(len(t) - 1 for t, _ in dataset[4:8]) + 1) % 16 == 0

    def token_losses(batch):
        inputs, targets, mask, *packing = batch
        logits = model(inputs, packing=packing[0] if packing else None)
        losses = nn.losses.cross_entropy(logits, targets, reduction="none")
        return np.array(losses)[np.array(mask)]

    plain = np.concatenate([token_losses(b) for b in lora.iterate_batches(dataset, 4)])
    loss_and_grad = nn.value_and_grad(model, lora.loss_fn)
    for by_example, multiple in ((True, 16), (False, 64)):
        packed_batches = [lora.make_batch(dataset[i:i + 4], True, by_example) for i in range(0, 12, 4)]
        sizes = [sum(len(t) - 1 for t, _ in dataset[i:i + 4]) for i in range(0, 12, 4)]
        assert [b[0].shape for b in packed_batches] == [(1, -(-(size + 1) // multiple) * multiple) for size in sizes]
        packed = np.concatenate([token_losses(b) for b in packed_batches])
        assert len(packed) == len(plain) == sum(len(t) - 1 for t, _ in dataset)
        assert np.abs(packed - plain).max() < 1e-4
        for i, batch in zip(range(0, 12, 4), packed_batches):
            (loss, _), grads = loss_and_grad(model, *batch)
            (expected_loss, _), expected = loss_and_grad(model, *lora.make_batch(dataset[i:i + 4], False))
            assert abs(loss.item() - expected_loss.item()) < 1e-5
            for (name, g), (_, e) in zip(tree_flatten(grads), tree_flatten(expected)):
                assert np.abs(np.array(g - e)).max() < 1e-5 * max(1, np.abs(np.array(e)).max()), name
    # and the packed mean loss is the unpacked one
    assert abs(lora.evaluate(model, dataset, 4, -1)[0] - float(packed.mean())) < 1e-5

    # sorted batches: each example once an epoch, less padding than shuffled ones
    sorted_order = lora.batch_order(dataset * 8, 4, True, 0, 0, sort=True)
    shuffled_order = lora.batch_order(dataset * 8, 4, True, 0, 0, sort=False)
    assert sorted(sum(sorted_order, [])) == sorted(sum(shuffled_order, [])) == list(range(96))
    padding = [sum(max(len(dataset[j % 12][0]) for j in b) * len(b) for b in order) for order in (sorted_order, shuffled_order)]
    assert padding[0] < padding[1]


@pytest.mark.parametrize("tied, targets", [(False, ["q_proj", "v_proj"]), (False, ["v_proj", "lm_head"]),
                                           (True, ["v_proj", "embed_tokens"])])
def test_chunked_loss_is_the_whole_loss(tied, targets, make_checkpoint, monkeypatch):
    """The loss and its gradient from logits computed a chunk of tokens at a time are those of the whole, the
    gradient of adapters on the output layer (or on the embedding tied to it) too."""
    import utils

    model, _, _ = utils.load(str(make_checkpoint("llama", tie_word_embeddings=tied)[0]))
    model.freeze()
    mx.random.seed(0)
    lora.models.linear_to_lora_layers(model, targets, -1, rank=4)
    for layer in models.lora_layers(model).values():
        layer.lora_a = 0.1 * mx.random.normal(layer.lora_a.shape)
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    tokens = mx.random.randint(3, 300, (3, 41))
    mask = mx.random.uniform(shape=(3, 40)) > 0.3
    loss_and_grad = nn.value_and_grad(model, lora.loss_fn)
    results = []
    for chunk in (10_000, 7):
        monkeypatch.setattr(lora, "LOSS_LOGITS", chunk * model.args.vocab_size)
        (loss, ntoks), grads = loss_and_grad(model, tokens[:, :-1], tokens[:, 1:], mask)
        results.append((loss.item(), ntoks.item(), dict(tree_flatten(grads))))
    logits = model(tokens[:, :-1])
    expected = (nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none") * mask).sum() / mask.sum()
    (whole, n, grads), (chunked, n_chunked, grads_chunked) = results
    assert n == n_chunked == mask.sum().item()
    assert abs(whole - expected.item()) < 1e-5 and abs(chunked - whole) < 1e-5
    # (the tied embedding's gradient, of about 10, sums the chunks' parts in another order)
    assert all(np.allclose(grads[k], grads_chunked[k], atol=1e-5) for k in grads)


def test_chunks_of_logits_are_held_one_at_a_time():
    """models.in_chunks runs the loss's chunks of logits one after another, forward and backward: the peak memory
    of the gradient does not grow with the number of chunks (MLX would otherwise compute every chunk's at once)."""
    head, vocab, rows = nn.Linear(64, 20_000, bias=False), 20_000, 512
    mx.eval(head.parameters())

    def peak(chunks):
        h, targets = mx.random.normal((chunks * rows, 64)), mx.random.randint(0, vocab, (chunks * rows,))

        def chunk(i):
            def losses(x):
                logits = head(x).astype(mx.float32)
                return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[i:i + rows, None], -1)[:, 0]
            return losses

        mx.eval(h, targets)
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(mx.grad(lambda h: models.in_chunks(chunk, h, rows).sum())(h))
        return (mx.get_peak_memory() - before) / (rows * vocab * 4)  # in chunks of float32 logits

    assert peak(16) < peak(4) + 1


def test_the_losss_logits_take_the_same_memory_whatever_the_vocabulary(make_checkpoint, monkeypatch):
    """A chunk of the loss holds LOSS_LOGITS logits, fewer tokens of a larger vocabulary: the gradient's peak
    memory for a 4x larger vocabulary is about the same, not 4x."""
    import utils

    monkeypatch.setattr(lora, "LOSS_LOGITS", 2**20)

    def peak(vocab):
        model, _, _ = utils.load(str(make_checkpoint("llama", vocab_size=vocab, num_hidden_layers=1)[0]))
        model.freeze()
        h, targets = mx.random.normal((2048, model.args.hidden_size)), mx.random.randint(0, vocab, (2048,))
        mx.eval(model.parameters(), h, targets)
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(mx.grad(lambda h: lora.state_losses(model, h, targets, mx.ones(2048, mx.bool_)).sum())(h))
        return mx.get_peak_memory() - before

    assert peak(32_000) < 1.5 * peak(8_000)


def test_dequantized_products_give_the_quantized_layers_gradient():
    """On the CPU a quantized layer multiplies by its dequantized weight, dequantized again for the backward
    pass: the gradient is that of the float layer with the dequantized weight."""
    import models

    layer = models.QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=32, bits=4)
    x = mx.random.normal((4, 16, 64))
    weight = models.dequantized_weight(layer, mx.float32)

    def through(f):
        return mx.grad(lambda x: (f(x) ** 2).sum())(x)

    expected = through(lambda x: x @ weight.T + layer.bias)
    assert np.abs(np.array(layer(x) - (x @ weight.T + layer.bias))).max() < 1e-5
    assert np.abs(np.array(through(layer) - expected)).max() < 1e-4
    assert np.abs(np.array(expected)).max() > 0


def test_cached_frozen_layers_give_the_same_training(tiny_llama, data_dir, tmp_path, capsys, monkeypatch):
    """The frozen layers' output computed once (frozen_prefix) trains and validates as computing it at every
    step does: the same losses, packed or not, and the same adapters from the command line."""
    import utils

    model, tokenizer, _ = utils.load(str(tiny_llama))
    splits = [lora.tokenize(lora.load_dataset(data_dir, s), tokenizer, 1, 2048, s) for s in ("train", "valid")]
    args = lora.build_parser().parse_args(["--learning-rate", "1e-2"])
    for pack in (False, True):
        curves = []
        for cached in (False, True):
            model = utils.load(str(tiny_llama))[0]
            model.freeze()
            mx.random.seed(0)
            lora.models.linear_to_lora_layers(model, ["q_proj", "v_proj"], 2, rank=4)
            args.cache_frozen_layers = cached
            config = lora.training_args(args)
            with lora.frozen_layers_cached(model, splits, config, 1000, str(tiny_llama)) as (train, valid):
                prefix = model.frozen_prefix
                assert (prefix is not None) == cached and (not cached or prefix.layer == 2)
                step = lora.make_step(model, lora.build_optimizer(config), config)
                batches = lora.iterate_batches(train, 4, train=True, pack=pack)
                curves.append([step(batches)[0].item() for _ in range(8)] + [lora.evaluate(model, valid, 4, -1)[0]])
        assert curves[0][7] < curves[0][0] - 0.3
        assert np.allclose(*curves, atol=1e-4), curves

    # the weights only the frozen layers use are released while training, and read back for --test after it
    cached, out = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "cached.safetensors", "--iters", 16,
                                 "--lora-layers", 2, "--learning-rate", 1e-3, "--test", "--test-batches", 2)
    assert "Computing the frozen layers 0-1 once for 68 examples" in out  # 64 train, --val-batches 1 of 4
    test_loss = re.search(r"Test loss (\d+\.\d+)", out).group(1)
    out = run_lora(capsys, "--model", tiny_llama, "--data", data_dir, "--adapter-file", tmp_path / "cached.safetensors",
                   "--test", "--test-batches", 2)
    assert re.search(r"Test loss (\d+\.\d+)", out).group(1) == test_loss
    plain, out = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "plain.safetensors", "--iters", 16,
                                "--lora-layers", 2, "--learning-rate", 1e-3, "--no-cache-frozen-layers")
    assert "frozen layers" not in out
    assert all(np.allclose(plain[k], cached[k], atol=1e-5) for k in plain)
    # a run shorter than an epoch (15 batches of 4 < 64 examples) would compute more than it saves
    _, out = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "short.safetensors", "--iters", 15,
                            "--lora-layers", 2)
    assert "frozen layers" not in out
    monkeypatch.setattr(lora, "memory_size", lambda: 1000)  # too little memory: not cached
    _, out = adapters_after(capsys, tiny_llama, data_dir, tmp_path / "small.safetensors", "--iters", 16,
                            "--lora-layers", 2)
    assert "frozen layers" not in out


def test_released_frozen_weights_free_memory_and_read_back(tiny_llama):
    import utils

    model = utils.load(str(tiny_llama))[0]
    model.freeze()
    lora.models.linear_to_lora_layers(model, ["q_proj"], 1)
    before = dict(tree_flatten(model.parameters()))
    memory = mx.get_active_memory()
    names = lora.release_frozen_weights(model, 3)
    freed = sum(before[k].nbytes for k in names)
    assert sorted(names) == sorted(k for k in before if k.startswith(("model.layers.0.", "model.layers.1.",
                                                                       "model.layers.2.", "model.embed_tokens.")))
    assert all(model.layers[i].input_layernorm.weight.size == 0 for i in range(3))
    assert model.layers[3].input_layernorm.weight.size > 0 and model.lm_head.weight.size > 0
    del before
    assert mx.get_active_memory() <= memory - freed + 1024  # the empty arrays in their place
    utils.reload_weights(model, str(tiny_llama), names)
    reloaded, fresh = (dict(tree_flatten(m.parameters())) for m in (model, utils.load(str(tiny_llama))[0]))
    assert all(np.array_equal(reloaded[k], fresh[k]) for k in names)


def test_frozen_layers_come_back_however_the_cache_is_left(tiny_llama, data_dir):
    """Leaving frozen_layers_cached by an error (or Ctrl-C) gives the model its weights back, as leaving it
    normally does: the model then gives the logits it gave before."""
    import utils

    model, tokenizer, _ = utils.load(str(tiny_llama))
    model.freeze()
    lora.models.linear_to_lora_layers(model, ["q_proj"], 1)
    rows = lora.tokenize(lora.load_dataset(data_dir, "valid"), tokenizer, 1, 2048, "valid")
    args = lora.training_args(lora.build_parser().parse_args([]))
    tokens = mx.array([rows[0][0]])
    expected = model(tokens)
    for error in (None, RuntimeError, KeyboardInterrupt):
        try:
            with lora.frozen_layers_cached(model, [rows], args, 1000, str(tiny_llama)):
                assert model.frozen_prefix.layer == 3 and model.layers[0].input_layernorm.weight.size == 0
                if error:
                    raise error
        except (RuntimeError, KeyboardInterrupt):
            pass
        assert model.frozen_prefix is None
        assert np.array_equal(np.array(model(tokens)), np.array(expected))


def test_validation_after_the_first_step_only_when_asked(tiny_llama, data_dir, tmp_path, capsys):
    """Validation runs every --steps-per-eval iterations, and after the first step only with --eval-on-start; a
    run that validates nowhere computes the frozen layers for the training set and the one validation batch that
    checks the adapters before a save, not for the whole validation set."""
    def run(*flags):
        return run_lora(capsys, "--model", tiny_llama, "--data", data_dir, "--train", "--batch-size", 4,
                        "--lora-layers", 1, "--adapter-file", tmp_path / "a.safetensors", *flags)

    assert sorted(val_losses(run("--iters", 4, "--steps-per-eval", 2))) == [2, 4]
    assert sorted(val_losses(run("--iters", 4, "--steps-per-eval", 2, "--eval-on-start"))) == [1, 2, 4]
    out = run("--iters", 100)
    train = len(lora.load_dataset(data_dir, "train"))
    assert not val_losses(out) and f"once for {train + 4} examples" in out


def test_the_cpu_trains_a_quantized_model_on_float_copies_with_the_same_numbers(tiny_llama, data_dir, tmp_path,
                                                                                 capsys, monkeypatch):
    """On the CPU the quantized layers a step computes become float copies while training (frozen, as they were;
    quantized again after), the layers below stay quantized, and training gives the adapters and losses it gives
    on the quantized layers."""
    import convert
    import utils

    convert.convert(convert.build_parser().parse_args(["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "q"),
                                                       "-q", "--q-group-size", "32"]))
    flags = ["--iters", 3, "--learning-rate", 1e-2, "--lora-layers", 1, "--steps-per-eval", 3]
    copies, out = adapters_after(capsys, tmp_path / "q", data_dir, tmp_path / "a.safetensors", *flags)
    monkeypatch.setattr(lora, "float_copies_on_the_cpu", lambda model: contextlib.nullcontext())
    quantized, again = adapters_after(capsys, tmp_path / "q", data_dir, tmp_path / "b.safetensors", *flags)
    assert all(np.allclose(copies[k], quantized[k], atol=1e-6) for k in copies) and copies.keys() == quantized.keys()
    assert val_losses(out) == pytest.approx(val_losses(again), abs=1e-6)
    model = utils.load(str(tmp_path / "q"))[0]
    model.freeze()
    lora.models.linear_to_lora_layers(model, ["self_attn.q_proj"], 1)
    monkeypatch.undo()
    with lora.float_copies_on_the_cpu(model):
        last, first = model.layers[-1], model.layers[0]
        assert isinstance(last.self_attn.q_proj.linear, nn.Linear) and isinstance(last.mlp.up_proj, nn.Linear)
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in last.named_modules())
        assert isinstance(first.mlp.up_proj, nn.QuantizedLinear)
        assert {k.rsplit(".", 1)[-1] for k, _ in tree_flatten(model.trainable_parameters())} == {"lora_a", "lora_b"}
    assert isinstance(model.layers[-1].self_attn.q_proj.linear, nn.QuantizedLinear)  # back as it was
    assert isinstance(model.layers[-1].mlp.up_proj, nn.QuantizedLinear)


def test_frozen_prefix_of_a_quantized_model(tiny_llama, data_dir):
    """Quantized frozen layers are dequantized for the pass (a copy: the model stays quantized), which gives
    the states the quantized layers give."""
    import utils

    model, tokenizer, _ = utils.load(str(tiny_llama))
    lora.models.quantize(model, lambda path, m: {"group_size": 32, "bits": 4} if isinstance(m, nn.Linear) else None)
    model.freeze()
    lora.models.linear_to_lora_layers(model, ["q_proj"], 1)
    rows = lora.tokenize(lora.load_dataset(data_dir, "valid"), tokenizer, 1, 2048, "valid")
    prefix, (cached,) = lora.frozen_prefix(model, [rows])
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    for tokens, _, first in cached[:3]:
        expected = model.run_layers(model.embed(mx.array(tokens[:-1])[None]), 0, 3)[0]
        assert np.abs(np.array(prefix.states[first:first + len(tokens) - 1] - expected)).max() < 1e-4


def test_pipelined_reads_a_step_after_launching_the_next_except_where_synced():
    events = []

    def launch(it):
        events.append(("launch", it))
        return [mx.array(it) * 2]

    for it, latest, (value,) in lora.pipelined(launch, range(1, 6), synced=lambda it: it == 3):
        assert value == 2 * it
        events.append(("read", it, latest))
    assert events == [("launch", 1), ("launch", 2), ("read", 1, False), ("launch", 3), ("read", 2, False),
                      ("read", 3, True), ("launch", 4), ("launch", 5), ("read", 4, False), ("read", 5, True)]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_dequantized_is_mx_dequantize(bits):
    weight = mx.random.normal((3, 64, 256), key=mx.random.key(bits))
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        for group_size in (32, 64, 128):
            quantized = mx.quantize(weight.astype(dtype), group_size, bits)
            for out in (dtype, mx.float32):
                expected = mx.dequantize(*quantized, group_size, bits, dtype=out)
                got = models.dequantized(*quantized, group_size, bits, out)
                assert got.dtype == out and mx.array_equal(got, expected).item(), (dtype, group_size, out)


def test_lora_plus_steps_peft_s_b_group_at_ratio_times_the_learning_rate(make_checkpoint):
    """--lora-plus-ratio: the arrays that PEFT's create_loraplus_optimizer gives ratio x lr (DoRA's lora_B and
    magnitudes) take AdamW's step at that learning rate, weight decay included; the others (lora_A) at lr."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    import utils

    folder, reference = make_checkpoint()
    peft_model = get_peft_model(reference, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    optimizer = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    peft_lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    ours_of = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "m"}
    faster = {next(ours for theirs, ours in ours_of.items() if theirs in name)
              for name, p in peft_model.named_parameters() if p.requires_grad and peft_lr[id(p)] == 16e-3}
    assert faster == {"lora_b", "m"}

    model = utils.load(str(folder))[0]
    model.freeze()
    lora.models.linear_to_lora_layers(model, ["q_proj"], 1, rank=4, kind="dora")
    params = model.trainable_parameters()
    grads = tree_map(lambda p: mx.random.normal(p.shape), params)

    def stepped(learning_rate, *flags):
        args = lora.training_args(lora.build_parser().parse_args(
            ["--learning-rate", str(learning_rate), "--optimizer", "adamw", "--weight-decay", "0.1", *flags]))
        return dict(tree_flatten(lora.build_optimizer(args).apply_gradients(grads, params)))

    plus, slow, fast = stepped(1e-3, "--lora-plus-ratio", "16"), stepped(1e-3), stepped(16e-3)
    assert set(plus) == {f"model.layers.3.self_attn.q_proj.{name}" for name in ("lora_a", "lora_b", "m")}
    for name, value in plus.items():
        expected = fast[name] if name.rsplit(".", 1)[-1] in faster else slow[name]
        assert np.abs(np.array(value - expected)).max() < 1e-6, name
    b = "model.layers.3.self_attn.q_proj.lora_b"
    assert np.abs(np.array(fast[b] - slow[b])).max() > 1e-4  # the two rates differ
