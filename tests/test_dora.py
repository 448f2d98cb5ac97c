"""DoRA (DoRALinear, its adapter files, fuse.py, PEFT and mlx-lm both ways) and "full" adapter files (fully
fine-tuned layers): loading, fusing and refusing."""
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from conftest import (ALL_TARGETS, FP32_ATOL, copy_of, logits, mlx_lm_adapter, random_adapter, randomized, run_fuse,
                      run_lora, torch_logits, val_losses)
from mlx.utils import tree_flatten, tree_map
from test_lora import assert_fuses, lora_layer

import models
import utils
from utils import UserError

PROMPT = "Q: the team when year is 7\nA: SELECT team FROM t WHERE year = 7"
SHORT_TARGETS = [t.split(".")[1] for t in ALL_TARGETS]  # as PEFT's target_modules names them


@pytest.fixture(scope="module")
def base(make_checkpoint):
    folder, reference = make_checkpoint("llama")
    tokens = utils.load(str(folder))[1].encode(PROMPT)
    return folder, reference, tokens


def trained_dora_layer(quantized):
    layer = lora_layer(quantized, layer_class=models.DoRALinear)
    layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    layer.m = layer.m * (1 + 0.2 * mx.random.normal(layer.m.shape))
    return layer


@pytest.mark.parametrize("quantized", [False, True])
def test_untrained_dora_adapter_changes_nothing(quantized):
    layer = lora_layer(quantized, layer_class=models.DoRALinear)
    x = mx.random.normal((3, 64))
    assert np.abs(np.array(layer(x) - layer.linear(x))).max() < FP32_ATOL / 10
    assert not np.allclose(trained_dora_layer(quantized)(x), layer(x), atol=1e-2)  # and a trained one does


@pytest.mark.parametrize("quantized", [False, True])
def test_dora_to_linear_equals_the_wrapped_forward(quantized):
    layer = trained_dora_layer(quantized)
    merged = models.LoRALinear.merged_weight(layer)  # W + scale * (lora_a @ lora_b).T
    assert_fuses(layer, (layer.m / mx.linalg.norm(merged, axis=1))[:, None] * merged)


def test_dora_trains_with_the_norm_detached():
    layer = trained_dora_layer(False)
    assert sorted(k for k, _ in tree_flatten(layer.trainable_parameters())) == ["lora_a", "lora_b", "m"]

    def loss(params, x):
        layer.update(params)
        return layer(x).sum()

    x = mx.random.normal((3, 64))
    grads = mx.grad(loss)(layer.trainable_parameters(), x)
    # with the norm n a constant, sum(m / n * (W x + scale * x @ a @ b)) has this gradient in b
    ratio = layer.m / mx.linalg.norm(models.LoRALinear.merged_weight(layer), axis=1)
    expected = layer.scale * (x @ layer.lora_a).sum(axis=0)[:, None] * ratio[None, :]
    assert np.abs(np.array(grads["lora_b"] - expected)).max() < 1e-4


def peft_dora(reference, layers):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=SHORT_TARGETS, layers_to_transform=layers,
                        use_dora=True, task_type="CAUSAL_LM")
    return get_peft_model(copy_of(reference), config).eval()


def test_dora_forward_equals_peft(base, tmp_path):
    folder, reference, tokens = base
    ours = random_adapter(folder, tmp_path / "adapters.safetensors", dora=True)  # rank 4, scale 2
    theirs = peft_dora(reference, [2, 3])
    with torch.no_grad():
        for path, layer in models.lora_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(path)
            peft_layer.lora_A["default"].weight.copy_(torch.from_numpy(np.array(layer.lora_a.T)))
            peft_layer.lora_B["default"].weight.copy_(torch.from_numpy(np.array(layer.lora_b.T)))
            peft_layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(np.array(layer.m)))
    expected = logits(ours, tokens)
    assert np.abs(expected - torch_logits(reference, tokens)).max() > 0.1  # the adapters matter
    assert np.abs(torch_logits(theirs, tokens) - expected).max() <= FP32_ATOL


def test_fused_dora_loads_in_transformers_and_exports_to_peft(base, tmp_path):
    import transformers
    from peft import PeftModel

    folder, reference, tokens = base
    adapted = random_adapter(folder, tmp_path / "adapters.safetensors", dora=True)
    expected = logits(adapted, tokens)
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors",
             "--save-path", tmp_path / "fused", "--export-peft", tmp_path / "peft")
    fused = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    assert np.abs(torch_logits(fused, tokens) - expected).max() <= FP32_ATOL
    assert "DoRA adapters" in (tmp_path / "fused" / "README.md").read_text()
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = PeftModel.from_pretrained(copy_of(reference), tmp_path / "peft").eval()
    assert np.abs(torch_logits(peft_model, tokens) - expected).max() <= FP32_ATOL


def test_peft_dora_adapters_load_here(base, tmp_path):
    folder, reference, tokens = base
    peft_model = randomized(peft_dora(reference, [1, 3]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    expected = torch_logits(peft_model, tokens)
    assert np.abs(expected - torch_logits(reference, tokens)).max() > 0.1

    ours, _, _ = utils.load(str(folder))
    utils.load_adapters(ours, tmp_path / "peft")
    layers = models.lora_layers(ours)
    assert len(layers) == 14 and all(isinstance(m, models.DoRALinear) for m in layers.values())
    assert np.abs(logits(ours, tokens) - expected).max() <= FP32_ATOL


def test_dora_adapters_both_ways_with_mlx_lm(base, tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.tuner.utils import load_adapters

    folder, _, tokens = base
    (tmp_path / "ours").mkdir()
    ours = random_adapter(folder, tmp_path / "ours" / "adapters.safetensors", dora=True)
    theirs, _ = mlx_lm.load(str(folder))
    load_adapters(theirs, str(tmp_path / "ours"))
    assert np.abs(logits(theirs, tokens) - logits(ours, tokens)).max() <= FP32_ATOL

    theirs = mlx_lm_adapter(folder, tmp_path / "theirs", dora=True)
    ours, _, _ = utils.load(str(folder))
    utils.load_adapters(ours, tmp_path / "theirs")
    assert np.abs(logits(ours, tokens) - logits(theirs, tokens)).max() <= FP32_ATOL


def full_weights(base, adapter_file):
    """Layers 2 and 3 fully fine-tuned (every weight changed), saved as lora.py and mlx-lm save them."""
    model, _, _ = utils.load(str(base))
    model.freeze()
    mx.random.seed(4)
    for layer in model.layers[2:]:
        layer.unfreeze()
        layer.update(tree_map(lambda w: w + 0.05 * mx.random.normal(w.shape), layer.parameters()))
    utils.save_adapters(adapter_file, model, {"fine_tune_type": "full", "num_layers": 2})
    return model


def test_full_weights_load_back_and_fuse(base, tmp_path):
    import transformers

    folder, reference, tokens = base
    (tmp_path / "full").mkdir()
    tuned = full_weights(folder, tmp_path / "full" / "adapters.safetensors")
    expected = logits(tuned, tokens)
    assert np.abs(expected - torch_logits(reference, tokens)).max() > 0.1

    ours, _, _ = utils.load(str(folder))
    ours.freeze()
    utils.load_adapters(ours, tmp_path / "full")
    assert np.abs(logits(ours, tokens) - expected).max() <= FP32_ATOL
    # what was loaded trains again, as loaded adapters do
    assert (sorted(k for k, _ in tree_flatten(ours.trainable_parameters()))
            == sorted(mx.load(str(tmp_path / "full" / "adapters.safetensors"))))

    mlx_lm = pytest.importorskip("mlx_lm")
    theirs, _ = mlx_lm.load(str(folder))
    mlx_lm.tuner.utils.load_adapters(theirs, str(tmp_path / "full"))
    assert np.abs(logits(theirs, tokens) - expected).max() <= FP32_ATOL

    run_fuse("--model", folder, "--adapter-file", tmp_path / "full", "--save-path", tmp_path / "fused")
    fused = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    assert np.abs(torch_logits(fused, tokens) - expected).max() <= FP32_ATOL


def test_bad_full_and_dora_files_are_one_line_errors(base, tmp_path):
    folder, _, _ = base
    full = tmp_path / "full.safetensors"
    full_weights(folder, full)
    name = "model.layers.3.mlp.down_proj.weight"
    wrong = tmp_path / "wrong" / "adapters.safetensors"
    wrong.parent.mkdir()
    mx.save_safetensors(str(wrong), {**mx.load(str(full)), name: mx.zeros((64, 64))})
    (wrong.parent / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full"}))
    dora = tmp_path / "dora" / "adapters.safetensors"
    dora.parent.mkdir()
    random_adapter(folder, dora, dora=True)
    (dora.parent / "adapter_config.json").unlink()  # read as LoRA, it would lose its magnitudes
    cases = [
        (wrong, [], rf"wrong/adapters.safetensors: does not fit this model: {name} has shape \(64, 64\), "
                    rf"the model.s is \(64, 128\)"),
        (full, ["--export-peft", tmp_path / "peft"], r"--export-peft: .*full.safetensors holds fully fine-tuned "
                                                     r"weights \(fine_tune_type \"full\"\), not adapters"),
        (dora, [], r"model.layers.2.mlp.down_proj.m is not a weight of lora adapters \(lora_a, lora_b\)"),
    ]
    for adapter, flags, message in cases:
        with pytest.raises(UserError, match=message) as error:
            run_fuse("--model", folder, "--adapter-file", adapter, "--save-path", tmp_path / "out", *flags)
        assert "\n" not in str(error.value)
        assert not (tmp_path / "out").exists() and not (tmp_path / "peft").exists()

    quantized, _, _ = utils.load(str(folder))
    models.quantize(quantized, lambda path, m: {"group_size": 32, "bits": 8} if isinstance(m, nn.Linear) else None)
    with pytest.raises(UserError, match=r"full.safetensors: holds full weights for model.layers.2.mlp.down_proj, "
                                        r"which is quantized in this model \(full weights load on a float base\)"):
        utils.load_adapters(quantized, full)


def test_dora_training_lowers_the_loss(tiny_llama, data_dir, tmp_path, capsys):
    out = run_lora(capsys, "--model", tiny_llama, "--data", data_dir, "--train", "--fine-tune-type", "dora",
                   "--iters", 30, "--learning-rate", 1e-2, "--lora-layers", -1, "--lora-rank", 4, "--lora-alpha", 16,
                   "--eval-on-start", "--steps-per-eval", 30, "--val-batches", -1, "--adapter-file",
                   tmp_path / "a.safetensors")
    losses = val_losses(out)
    assert losses[30] < losses[1] - 0.5, out
    saved = mx.load(str(tmp_path / "a.safetensors"))
    base = dict(tree_flatten(utils.load(str(tiny_llama))[0].parameters()))
    magnitudes = [k for k in saved if k.endswith(".m")]
    assert len(magnitudes) == 8 and len(saved) == 24
    assert all(not np.allclose(saved[k], np.linalg.norm(base[k[:-2] + ".weight"], axis=1)) for k in magnitudes)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fine_tune_type"] == "dora"


def test_full_fine_tuning_trains_the_last_layers_and_resumes(tiny_llama, data_dir, tmp_path, capsys):
    flags = ["--model", tiny_llama, "--data", data_dir, "--train", "--iters", 4, "--lora-layers", 2,
             "--learning-rate", 1e-3, "--eval-on-start", "--steps-per-eval", 100, "--val-batches", 1]
    run_lora(capsys, *flags, "--fine-tune-type", "full", "--adapter-file", tmp_path / "full.safetensors")
    saved = mx.load(str(tmp_path / "full.safetensors"))
    base = dict(tree_flatten(utils.load(str(tiny_llama))[0].parameters()))
    assert {k.split(".")[2] for k in saved} == {"2", "3"}
    assert sorted(saved) == sorted(k for k in base if k.startswith(("model.layers.2.", "model.layers.3.")))
    assert all(not np.allclose(saved[k], base[k]) for k in saved if k.endswith("proj.weight"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "full" and config["num_layers"] == 2
    # --resume-adapter-file takes the kind from the file: the same layers train on
    run_lora(capsys, *flags, "--resume-adapter-file", tmp_path / "full.safetensors",
             "--adapter-file", tmp_path / "more.safetensors")
    more = mx.load(str(tmp_path / "more.safetensors"))
    assert sorted(more) == sorted(saved) and not np.allclose(more["model.layers.3.mlp.up_proj.weight"],
                                                             saved["model.layers.3.mlp.up_proj.weight"])


def test_full_fine_tuning_checks_the_layer_count(tiny_llama, data_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="--lora-layers 5: the model has 4 layers"):
        run_lora(capsys, "--model", tiny_llama, "--data", data_dir, "--train", "--fine-tune-type", "full",
                 "--lora-layers", 5, "--adapter-file", tmp_path / "full.safetensors")
