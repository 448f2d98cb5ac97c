"""LoRALinear, adapter files, and lora.py end to end on a tiny random model."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import lora
import models
import utils
from conftest import FP32_ATOL, ROOT, run_fuse, run_lora, sql_texts, val_losses, write_jsonl


def lora_layer(quantized, rank=4, layer_class=models.LoRALinear):
    linear = nn.Linear(64, 48, bias=True)
    if quantized:
        linear = nn.QuantizedLinear.from_linear(linear, group_size=32, bits=4)
    linear.freeze()  # as the model's layers are when wrapped
    return layer_class.from_linear(linear, rank=rank, scale=2.0)


@pytest.mark.parametrize("quantized", [False, True])
def test_untrained_adapter_changes_nothing(quantized):
    layer = lora_layer(quantized)
    x = mx.random.normal((3, 64))
    assert mx.array_equal(layer(x), layer.linear(x))


@pytest.mark.parametrize("quantized", [False, True])
def test_to_linear_equals_the_wrapped_forward(quantized):
    layer = lora_layer(quantized)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    assert_fuses(layer, layer.base_weight() + layer.scale * (layer.lora_a @ layer.lora_b).T)


def assert_fuses(layer, exact):
    """layer.to_linear() gives the layer's outputs, with `exact` (the merged weight) as its weight; over a
    quantized base, quantized again with the base's own bits and group size: off by at most one quantization
    step per weight (what mx.quantize itself guarantees)."""
    x = mx.random.normal((3, 64))
    fused = layer.to_linear()
    if not isinstance(layer.linear, nn.QuantizedLinear):
        assert type(fused) is nn.Linear and np.abs(np.array(fused.weight - exact)).max() < 1e-6
        assert np.abs(np.array(fused(x) - layer(x))).max() < FP32_ATOL / 10
        return
    assert isinstance(fused, nn.QuantizedLinear) and (fused.bits, fused.group_size) == (4, 32)
    step = mx.abs(mx.repeat(fused.scales, 32, axis=-1))
    assert (mx.abs(models.dequantized_weight(fused, mx.float32) - exact) <= step * 1.001).all()
    assert np.abs(np.array(fused(x) - layer(x))).max() < 0.5


def test_only_lora_parameters_train_and_are_saved(tiny_llama, tmp_path):
    model, _, _ = utils.load(str(tiny_llama))
    model.freeze()
    models.linear_to_lora_layers(model, ["self_attn.q_proj", "v_proj"], 2, rank=4)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert sorted(trainable) == sorted(f"model.layers.{i}.self_attn.{p}_proj.lora_{ab}"
                                       for i in (2, 3) for p in "qv" for ab in "ab")
    for name in ("adapters.safetensors", "adapters.npz"):
        utils.save_adapters(tmp_path / name, model, {"lora_parameters": {"scale": 20.0}})
        assert sorted(mx.load(str(tmp_path / name))) == sorted(trainable)


def test_adapters_load_back(tiny_llama, tmp_path):
    model, _, _ = utils.load(str(tiny_llama))
    model.freeze()
    models.linear_to_lora_layers(model, ["q_proj", "v_proj"], 2, rank=4, scale=3.0)
    for _, lora_layer_ in model.named_modules():
        if isinstance(lora_layer_, models.LoRALinear):
            lora_layer_.lora_b = mx.random.normal(lora_layer_.lora_b.shape)
    utils.save_adapters(tmp_path / "a.safetensors", model, {"lora_parameters": {"scale": 3.0}})
    tokens = mx.array([[5, 6, 7, 8, 9]])
    fresh, _, _ = utils.load(str(tiny_llama))
    assert not np.allclose(fresh(tokens), model(tokens), atol=1e-3)
    utils.load_adapters(fresh, tmp_path / "a.safetensors")
    assert np.abs(np.array(fresh(tokens) - model(tokens))).max() < 1e-5


def test_linear_to_lora_layers_rejects_unknown_targets(tiny_llama):
    model, _, _ = utils.load(str(tiny_llama))
    with pytest.raises(ValueError, match="matches no layer; choices: self_attn.q_proj"):
        models.linear_to_lora_layers(model, ["qkv_proj"], 2)
    with pytest.raises(ValueError, match="the model has 4 layers"):
        models.linear_to_lora_layers(model, ["q_proj"], 5)


def test_training_lowers_the_loss_and_resumes(tiny_llama, make_checkpoint, data_dir, tmp_path, capsys):
    adapters = tmp_path / "run" / "adapters.safetensors"
    common = ["--model", tiny_llama, "--data", data_dir, "--batch-size", 4, "--learning-rate", 1e-2,
              "--lora-layers", -1, "--lora-rank", 4, "--steps-per-report", 10, "--val-batches", -1]
    out = run_lora(capsys, *common, "--train", "--iters", 40, "--eval-on-start", "--steps-per-eval", 40,
                   "--adapter-file", adapters, "--lora-alpha", 16,
                   "--lora-targets", "self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    losses = val_losses(out)
    assert losses[40] < losses[1] - 0.5, out
    assert re.search(r"Iter 10: Train loss [\d.]+, It/sec [\d.]+, Tokens/sec [\d.]+", out)
    config = json.loads((adapters.parent / "adapter_config.json").read_text())
    assert config["base_model"] == str(tiny_llama) and config["num_layers"] == 4
    assert config["lora_parameters"] == {"rank": 4, "scale": 4.0, "dropout": 0.0,
                                         "keys": ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]}

    # resuming starts where the first run ended, and goes on lowering the loss
    resumed = tmp_path / "resumed.npz"
    out = run_lora(capsys, *common, "--train", "--iters", 40, "--eval-on-start", "--steps-per-eval", 40,
                   "--resume-adapter-file", adapters, "--adapter-file", resumed)
    again = val_losses(out)
    assert again[1] < losses[1] - 0.3 and again[40] < losses[40], out
    assert sorted(np.load(resumed)) == sorted(mx.load(str(adapters)))

    # --test and --prompt rebuild the model from the adapter file and its config alone
    out = run_lora(capsys, "--model", tiny_llama, "--data", data_dir, "--adapter-file", resumed, "--test",
                   "--prompt", "Q: the team when year is 7\nA:", "--temp", 0, "--max-tokens", 12)
    loss, ppl = map(float, re.search(r"Test loss (\d+\.\d+), Test ppl (\d+\.\d+)", out).groups())
    assert math.isclose(ppl, math.exp(loss), rel_tol=1e-3) and loss < losses[1]
    assert "SELECT" in out.split("A:", 1)[1], out

    # an adapter file that was named but is missing is an error, not a silent fallback to the base model
    with pytest.raises(utils.UserError, match="no such file"):
        run_lora(capsys, "--model", tiny_llama, "--data", data_dir, "--test",
                 "--adapter-file", tmp_path / "missing.safetensors")

    # the adapters record their base: on a model of another depth, whose first layers they would fit, they are an
    # error; on the same model elsewhere, a warning
    assert config["base_model_config"] == {"model_type": "llama", "vocab_size": 300, "num_hidden_layers": 4,
                                           "hidden_size": 64}
    deeper, _ = make_checkpoint("llama", num_hidden_layers=6)
    for command in (lambda: run_lora(capsys, "--model", deeper, "--data", data_dir, "--test",
                                     "--adapter-file", adapters),
                    lambda: run_lora(capsys, *common, "--model", deeper, "--train", "--iters", 1,
                                     "--resume-adapter-file", adapters, "--adapter-file", tmp_path / "deeper.npz"),
                    lambda: run_fuse("--model", deeper, "--adapter-file", adapters, "--save-path", tmp_path / "fused")):
        with pytest.raises(utils.UserError, match=rf"{re.escape(str(adapters))}: made for a model of "
                                                  rf"num_hidden_layers 4, not 6, whose layers are not this one's"):
            command()
    elsewhere = shutil.copytree(tiny_llama, tmp_path / "elsewhere")
    out = run_lora(capsys, "--model", elsewhere, "--data", data_dir, "--test", "--adapter-file", adapters)
    assert f"[WARNING] {adapters}: made for {tiny_llama}, not {elsewhere}." in out and "Test loss" in out
    run_fuse("--model", elsewhere, "--adapter-file", adapters, "--export-peft", tmp_path / "peft")
    assert f"[WARNING] {adapters}: made for {tiny_llama}, not {elsewhere}." in capsys.readouterr().out
    out = run_lora(capsys, "--model", os.path.relpath(tiny_llama), "--data", data_dir, "--test",
                   "--adapter-file", adapters)
    assert "[WARNING]" not in out


def test_no_adapter_uses_the_base_model(tiny_llama, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_lora(capsys, "--model", tiny_llama, "--data", data_dir, "--test", "--test-batches", 1)
    assert "using the base model" in out and "Test ppl" in out


@pytest.mark.parametrize("content, error", [
    (None, r"train.jsonl: no such file"),
    ("", r"train.jsonl: no examples"),
    ('{"text": "fine"}\n{"text": "cut\n', r"train.jsonl:2: not valid JSON"),
    ('{"text": "fine"}\n\n{"prompt": "a", "completion": "b"}\n',
     r"train.jsonl:3: a completion example, but line 1 is a text example \(one format per file\)"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', r"train.jsonl:2: not an example: expected"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": []}\n', r"train.jsonl:2: not an example"),
    ('["text"]\n', r'train.jsonl:1: not an example'),
])
def test_bad_data_is_one_error_before_loading(tmp_path, content, error):
    write_jsonl(tmp_path / "valid.jsonl", ["ok"])
    if content is not None:
        (tmp_path / "train.jsonl").write_text(content)
    # the model does not exist: the data error must come first
    args = lora.build_parser().parse_args(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path), "--train"])
    with pytest.raises(utils.UserError, match=error):
        lora.main(args)


def test_command_line_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "lora.py"), "--data", str(tmp_path), "--train"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == f"lora.py: error: {tmp_path / 'train.jsonl'}: no such file\n"


@pytest.mark.parametrize("line, flags", [
    ("mask_prompt: true", {"mask_prompt": True}), ("mask_prompt: false", {"mask_prompt": False}),
    ("cache_frozen_layers: off", {"cache_frozen_layers": False}), ("learning_rate: 1e-4", {"learning_rate": 1e-4}),
    ("lora_targets: q_proj", {"lora_targets": ["q_proj"]}), ("iters: '5'", {"iters": 5}),
    # mlx-lm's keys (its lora_config.yaml)
    ("num_layers: 4", {"lora_layers": 4}), ("training_mode: normal", {"train_mode": "sft"}),
    ("lora_parameters: {rank: 4, scale: 2.0, dropout: 0.1, keys: [self_attn.q_proj]}",
     {"lora_rank": 4, "lora_scale": 2.0, "lora_dropout": 0.1, "lora_targets": ["self_attn.q_proj"]}),
    ("adapter_path: out", {"adapter_file": os.path.join("out", "adapters.safetensors")}),
    ("resume_adapter_file: null", {"resume_adapter_file": None}),
    ("{optimizer: adamw, optimizer_config: {adamw: {weight_decay: 0.05}, sgd: {momentum: 0.9}}}",
     {"optimizer": "adamw", "weight_decay": 0.05}),
    ("{learning_rate: 1, lr_schedule: {name: cosine_decay, warmup: 10, arguments: [1e-5, 990, 0]}}",
     {"lr_schedule": "cosine", "warmup": 10, "learning_rate": 1e-5}),
    ("{iters: 20, lr_schedule: {name: linear_schedule, arguments: [1e-4, 0, 20]}}",
     {"lr_schedule": "linear", "warmup": 0, "learning_rate": 1e-4}),
    ("hf_dataset: {path: me/qa, prompt_feature: question, completion_feature: answer}",
     {"data": "me/qa", "train_split": "train[:80%]", "valid_split": "train[-10%:]", "test_split": None,
      "prompt_feature": "question", "completion_feature": "answer"}),
    ("hf_dataset: [{name: billsum, train_split: 'train[:1000]', text_feature: text}]",
     {"data": "billsum", "train_split": "train[:1000]", "text_feature": "text"}),
    ("{clear_cache_threshold: 0, trust_remote_code: false, project_name: null}", {}),
])
def test_yaml_values_are_the_flags_values(tmp_path, line, flags):
    (tmp_path / "run.yaml").write_text(line + "\n")
    args = vars(lora.parse_args(["--config", str(tmp_path / "run.yaml"), "--test"]))
    assert {k: args[k] for k in flags} == flags


@pytest.mark.parametrize("line, error", [
    *[(f"{key}: {value}", rf"{key}: --{key.replace('_', '-')} is a switch: expected true or false, not \"{word}\"")
      for key, value, word in [("mask_prompt", '"false"', "false"), ("grad_checkpoint", "'no'", "no"),
                               ("cache_frozen_layers", '"off"', "off"), ("pack", "'0'", "0")]],
    ("lora_layers: [1, 2]", r"lora_layers: --lora-layers: expected a number, not \[1, 2\]"),
    ("batch_size: 4.5", r"batch_size: --batch-size: must be an integer of at least 1, not '4.5'"),
    ("model:", r"model: --model: expected text, not null"),
    ("prompt: yes", r"prompt: --prompt: expected text, not true"),
    ("lora_targets: {q_proj: 1}", r"lora_targets: --lora-targets: expected text, or a list of them, not "),
    ("lora_targets: []", r"lora_targets: --lora-targets: expected text, or a list of them, not \[\]"),
    ("add_eos_token: 2", r"add_eos_token: --add-eos-token: must be one of 0, 1, not 2"),
    # mlx-lm's keys that lora.py cannot honour
    ("lora_parameters: {rank: 4, alpha: 16}",
     r"lora_parameters: alpha: lora.py reads no other key of lora_parameters than rank, scale, dropout, keys"),
    ("lora_parameters: 8", r"lora_parameters: expected a mapping of dropout, keys, rank, scale to values"),
    ("lr_schedule: {name: exponential_decay, arguments: [1e-5, 0.9]}",
     r"lr_schedule: name: \"exponential_decay\": lora.py's schedules are those of mlx-lm's cosine_decay or "),
    ("lr_schedule: {name: cosine_decay, warmup: 100, arguments: [1e-5, 900, 1e-7]}",
     r"lr_schedule: arguments: the schedule ends at 1e-07: lora.py's decays to 0"),
    ("lr_schedule: {name: cosine_decay, warmup: 100, arguments: [1e-5, 1000]}",
     r"lr_schedule: arguments: the decay takes 1000 steps: lora.py's takes those after the warmup, iters - warmup "
     r"= 900"),
    ("lr_schedule: {name: cosine_decay, warmup_init: 1e-7, warmup: 10, arguments: [1e-5, 990]}",
     r"lr_schedule: warmup_init: 1e-7: lora.py's warmup starts from 0"),
    ("lr_schedule: {name: linear_schedule, arguments: [1e-5]}",
     r"lr_schedule: arguments: expected linear_schedule's \[initial rate, final rate, steps\]"),
    ("optimizer_config: {adam: {betas: [0.9, 0.98]}}",
     r"optimizer_config: adam: betas: lora.py reads no other key of optimizer_config: adam than weight_decay"),
    ("hf_dataset: [{path: a}, {path: b}]", r"hf_dataset: 2 datasets: lora.py trains on one"),
    ("hf_dataset: {path: a, config: {name: b}}", r"hf_dataset: config: lora.py reads no other key of hf_dataset "),
    ("trust_remote_code: true", r"trust_remote_code: lora.py runs no code from a model's repository"),
    ("clear_cache_threshold: 1", r"clear_cache_threshold: lora.py does not clear MLX's cache between steps"),
    ("wandb: project", r"wandb is not a flag of lora.py, nor a key of mlx-lm's config"),
])
def test_yaml_values_of_the_wrong_type_name_the_file_and_key(tmp_path, line, error):
    (tmp_path / "run.yaml").write_text(line + "\n")
    with pytest.raises(utils.UserError, match=rf"^--config {re.escape(str(tmp_path / 'run.yaml'))}: {error}"):
        lora.parse_args(["--config", str(tmp_path / "run.yaml"), "--test"])


def test_tilde_is_home_in_every_path_flag(tmp_path, monkeypatch):
    """Where a shell leaves ~ as it is (in quotes, after --flag=) and in a YAML file."""
    import convert
    import fuse

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run.yaml").write_text("model: ~/m\ndata: ~/d\nadapter_file: ~/a.safetensors\n")
    args = lora.parse_args(["--config=~/run.yaml", "--test"])
    assert [args.model, args.data, args.adapter_file] == [str(tmp_path / name) for name in ("m", "d", "a.safetensors")]
    args = lora.build_parser().parse_args(["--resume-adapter-file=~/r", "--resume=~/c", "--list-targets=~/l"])
    assert [args.resume_adapter_file, args.resume, args.list_targets] == [str(tmp_path / name) for name in "rcl"]
    args = fuse.build_parser().parse_args(["--model=~/m", "--adapter-file=~/a", "--save-path=~/s", "--export-peft=~/p",
                                           "--export-gguf=~/g.gguf"])
    assert [args.model, args.adapter_file, args.save_path, args.export_peft, args.export_gguf] == [
        str(tmp_path / name) for name in ("m", "a", "s", "p", "g.gguf")]
    args = convert.build_parser().parse_args(["--hf-path=~/h", "--mlx-path=~/o"])
    assert [args.hf_path, args.mlx_path] == [str(tmp_path / "h"), str(tmp_path / "o")]


def test_long_examples_are_truncated_with_one_warning(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "test.jsonl", sql_texts(6) + ["word " * 300, "word " * 400])
    out = run_lora(capsys, "--model", tiny_llama, "--data", tmp_path, "--test", "--max-seq-length", 64)
    assert out.count("[WARNING]") == 1
    assert "2 of 8 test examples are longer than --max-seq-length 64 tokens" in out


def test_divergence_stops_with_the_iteration(tiny_llama, data_dir, tmp_path):
    """A learning rate beyond float32's range: the first update leaves the adapters infinite."""
    args = lora.build_parser().parse_args([
        "--model", str(tiny_llama), "--data", str(data_dir), "--train", "--iters", "10", "--learning-rate", "1e39", "--lora-layers", "2",
        "--adapter-file", str(tmp_path / "adapters.safetensors"), "--save-every", "1", "--val-batches", "0"])
    with pytest.raises(utils.UserError, match=r"iteration 1: the adapter weights are not finite; training "
                                              r"stopped \(this run saved nothing\)"):
        lora.main(args)
    assert not (tmp_path / "adapters.safetensors").exists()


def test_evaluation_memory_does_not_grow_with_the_set(tiny_llama):
    model, _, _ = utils.load(str(tiny_llama))
    rows = [(list(range(3, 250)), 0)] * 40
    mx.reset_peak_memory()
    lora.evaluate(model, rows, 4, 1)
    one_batch = mx.get_peak_memory()
    mx.reset_peak_memory()
    lora.evaluate(model, rows, 4, -1)
    assert mx.get_peak_memory() < 1.5 * one_batch
