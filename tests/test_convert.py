"""convert.py: float and quantized conversions of sharded checkpoints and GGUF files, QLoRA on the result,
upload through a replaced hub client, and each bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import FP32_ATOL, ROOT, FakeHub, random_checkpoint, sql_texts, val_losses, write_gguf
from mlx import nn
from mlx.utils import tree_flatten

import convert
import lora
import models
import utils
from utils import UserError

PROMPT = "Q: the team when year is 7\nA: SELECT team FROM t WHERE year = 7"


@pytest.fixture(scope="module")
def sharded(make_checkpoint, tokenizer_dir, tmp_path_factory):
    """A tiny random llama written by transformers in several safetensors shards, and the torch model."""
    folder, reference = make_checkpoint("llama")
    path = tmp_path_factory.mktemp("sharded")
    reference.save_pretrained(path, max_shard_size="200KB")
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, path)
    assert len(list(path.glob("*.safetensors"))) >= 3
    return path, reference


def run_convert(*flags):
    convert.convert(convert.build_parser().parse_args([str(f) for f in flags]))


def torch_logits(reference, tokens, weights=None):
    if weights is not None:
        reference = type(reference)(reference.config).eval()
        reference.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()},
                                  strict=False)
        if reference.config.tie_word_embeddings:
            reference.tie_weights()
    with torch.no_grad():
        return reference(torch.tensor([tokens])).logits.numpy()


def stored(folder):
    """Every tensor of a converted folder, read through its index (which must list exactly the shards' contents)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        tensors.update(mx.load(str(folder / shard)))
    assert set(tensors) == set(index)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(set(index.values()))
    return tensors


def test_float_conversion_in_shards_loads_here_and_in_transformers(sharded, tmp_path):
    import transformers

    source, reference = sharded
    out = tmp_path / "mlx_model"
    run_convert("--hf-path", source, "--mlx-path", out, "--dtype", "float32", "--max-shard-size", 150e-6)
    tensors = stored(out)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and all(p.stat().st_size <= 150_000 + 1024 for p in shards)
    assert set(tensors) == set(reference.state_dict())
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32" and "quantization" not in config
    assert str(source) in (out / "README.md").read_text()

    model, tokenizer, _ = utils.load(str(out))
    tokens = tokenizer.encode(PROMPT)
    expected = torch_logits(reference, tokens)
    assert np.abs(np.array(model(mx.array([tokens]))) - expected).max() <= FP32_ATOL
    # the folder is in the Hugging Face layout: transformers reads it as it is
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert np.abs(torch_logits(again, tokens) - expected).max() <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(out).encode(PROMPT) == tokens


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_conversion_is_the_rounded_weights(sharded, tmp_path, dtype):
    source, reference = sharded
    run_convert("--hf-path", source, "--mlx-path", tmp_path / "m", "--dtype", dtype)
    for name, value in stored(tmp_path / "m").items():
        assert value.dtype == getattr(mx, dtype)
        expected = mx.array(reference.state_dict()[name].numpy()).astype(getattr(mx, dtype))
        assert mx.array_equal(value, expected), name


def test_quantized_conversions_each_bit_width(sharded, tmp_path):
    """Each weight is within its quantization step of the source; the loaded model computes what the
    transformers model does on those (dequantized) weights; the error in the logits shrinks with each bit."""
    source, reference = sharded
    tokens = utils.load(str(source))[1].encode(PROMPT)
    exact = torch_logits(reference, tokens)
    errors = []
    for bits in (2, 3, 4, 5, 6, 8):
        out = tmp_path / f"q{bits}"
        run_convert("--hf-path", source, "--mlx-path", out, "--dtype", "float32", "-q", "--q-bits", bits,
                    "--q-group-size", 32)
        config = json.loads((out / "config.json").read_text())
        # the embedding and the output layer at --q-embedding-bits (8), written as mlx-lm does
        eight = {"group_size": 32, "bits": 8, "mode": "affine"}
        assert config["quantization"] == dict(eight, bits=bits, **(
            {"model.embed_tokens": eight, "lm_head": eight} if bits != 8 else {}))
        tensors = stored(out)
        dequantized = {}
        for name, value in reference.state_dict().items():
            path = name.rsplit(".", 1)[0]
            if f"{path}.scales" not in tensors:
                assert "norm" in name  # every linear layer and the embedding are quantized
                dequantized[name] = tensors[name]
                continue
            scales = tensors[f"{path}.scales"]
            layer_bits = 8 if path in ("model.embed_tokens", "lm_head") else bits
            weight = mx.dequantize(tensors[name], scales, tensors[f"{path}.biases"], 32, layer_bits)
            step = np.repeat(np.abs(np.array(scales)), 32, axis=-1)
            assert (np.abs(np.array(weight) - value.numpy()) <= step * (1 + 1e-4)).all(), name
            dequantized[name] = weight

        model, _, _ = utils.load(str(out))
        assert isinstance(model.layers[0].mlp.down_proj, nn.QuantizedLinear)
        assert model.layers[0].mlp.down_proj.bits == bits
        logits = np.array(model(mx.array([tokens])))
        assert np.abs(logits - torch_logits(reference, tokens, dequantized)).max() <= FP32_ATOL
        errors.append(np.abs(logits - exact).mean())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_quantized_source_is_dequantized_without_q(sharded, tmp_path):
    source, _ = sharded
    run_convert("--hf-path", source, "--mlx-path", tmp_path / "q4", "-q", "--q-group-size", 32)
    run_convert("--hf-path", tmp_path / "q4", "--mlx-path", tmp_path / "f32", "--dtype", "float32")
    quantized, dequantized = stored(tmp_path / "q4"), stored(tmp_path / "f32")
    assert not any(k.endswith(".scales") for k in dequantized)
    assert "quantization" not in json.loads((tmp_path / "f32" / "config.json").read_text())
    weight = mx.dequantize(*(quantized[f"model.layers.1.self_attn.o_proj.{k}"] for k in ("weight", "scales", "biases")),
                           32, 4)
    assert mx.allclose(dequantized["model.layers.1.self_attn.o_proj.weight"], weight, rtol=0, atol=1e-6)


def test_gguf_source(make_checkpoint, tmp_path):
    from gguf import GGMLQuantizationType

    folder, reference = make_checkpoint("llama")
    write_gguf(tmp_path / "tiny.gguf", folder, reference, GGMLQuantizationType.Q4_0)
    run_convert("--hf-path", tmp_path / "tiny.gguf", "--mlx-path", tmp_path / "out", "--dtype", "float32")
    assert not any(k.endswith(".scales") for k in stored(tmp_path / "out"))
    from_gguf, gguf_tokenizer, _ = utils.load(str(tmp_path / "tiny.gguf"))
    converted, tokenizer, _ = utils.load(str(tmp_path / "out"))
    tokens = tokenizer.encode(PROMPT)
    assert tokens == gguf_tokenizer.encode(PROMPT)
    expected = np.array(from_gguf(mx.array([tokens])))
    assert np.abs(np.array(converted(mx.array([tokens]))) - expected).max() <= FP32_ATOL


def test_qlora_on_a_converted_model_trains_adapters_only(sharded, tmp_path, capsys):
    source, _ = sharded
    out = tmp_path / "q4"
    run_convert("--hf-path", source, "--mlx-path", out, "-q", "--q-group-size", 32)
    model, tokenizer, _ = utils.load(str(out))
    model.freeze()
    models.linear_to_lora_layers(model, ["q_proj", "v_proj"], -1, rank=8, scale=20.0)
    base = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if "lora_" not in k}
    args = lora.training_args(lora.build_parser().parse_args(["--train", "--iters", "40", "--learning-rate", "1e-3",
                                                              "--eval-on-start", "--steps-per-eval", "40",
                                                              "--steps-per-report", "40"]))
    data = [lora.tokenize([{"text": t} for t in sql_texts(n, seed)], tokenizer, True, 256, "")
            for n, seed in ((64, 1), (16, 2))]
    lora.train(model, *data, args, tmp_path / "adapters.safetensors", {})
    losses = val_losses(capsys.readouterr().out)
    assert losses[40] < losses[1] - 0.5, losses
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if "lora_" not in k}
    assert all(np.array_equal(base[k], after[k]) for k in base)
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    assert saved and all(k.endswith((".lora_a", ".lora_b")) for k in saved)


def test_upload(sharded, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    source, _ = sharded
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(utils, "hub_snapshot", lambda repo: source)  # "someone/tiny-llama" is fetched from here
    run_convert("--hf-path", "someone/tiny-llama", "--mlx-path", tmp_path / "out", "-q", "--q-group-size", 32,
                "--upload-name", "me/tiny-llama-4bit")
    assert [c[0] for c in FakeHub.calls] == ["whoami", "create_repo", "upload_folder"]
    assert FakeHub.calls[1][1] == {"repo_id": "me/tiny-llama-4bit", "repo_type": "model", "exist_ok": True}
    _, upload, files, card = FakeHub.calls[2]
    assert upload["folder_path"] == str(tmp_path / "out") and upload["repo_id"] == "me/tiny-llama-4bit"
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "README.md"} <= set(files)
    assert "base_model: someone/tiny-llama" in card and "https://huggingface.co/someone/tiny-llama" in card
    assert "https://huggingface.co/me/tiny-llama-4bit" in capsys.readouterr().out


def test_upload_without_token_or_network_fails_before_converting(sharded, tmp_path, monkeypatch):
    import huggingface_hub

    source, _ = sharded
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    flags = ["--hf-path", source, "--mlx-path", tmp_path / "out", "--upload-name", "me/x"]
    with pytest.raises(UserError, match="no Hugging Face token"):
        run_convert(*flags)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(UserError, match="the Hugging Face hub cannot be reached"):
        run_convert(*flags)
    assert not (tmp_path / "out").exists()


def test_failed_upload_keeps_the_converted_model(sharded, tmp_path, monkeypatch):
    import huggingface_hub

    class FailingHub(FakeHub):
        def upload_folder(self, **kwargs):
            raise ConnectionError("connection reset")

    monkeypatch.setattr(huggingface_hub, "HfApi", FailingHub)
    with pytest.raises(UserError, match=r"upload failed .*the model is in"):
        run_convert("--hf-path", sharded[0], "--mlx-path", tmp_path / "out", "--upload-name", "me/x")
    assert utils.load(str(tmp_path / "out"))


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_bad_inputs_are_one_line_errors_leaving_nothing(sharded, tmp_path):
    source, _ = sharded
    out = tmp_path / "out"
    no_config = tmp_path / "no_config"
    shutil.copytree(source, no_config)
    (no_config / "config.json").unlink()
    no_weights = tmp_path / "no_weights"
    shutil.copytree(source, no_weights, ignore=shutil.ignore_patterns("*.safetensors*"))
    unknown = tmp_path / "unknown"
    shutil.copytree(source, unknown)
    config = json.loads((source / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(dict(config, model_type="gpt_neox")))
    misfit = tmp_path / "misfit"
    shutil.copytree(source, misfit)
    (misfit / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
    cases = [
        ((no_config,), "no config.json"),
        ((no_weights,), r"no \*.safetensors weights"),
        ((unknown,), "model_type 'gpt_neox' is not supported; supported: llama, mistral"),
        ((misfit,), r"misfit: the weights do not fit its config: of the wrong shape: model.layers.0.mlp.gate_proj.weight \(128, 64\)"),
        ((tmp_path / "nowhere",), "--hf-path .*nowhere: no such file or folder"),
    ]
    for flags, message in cases:
        with pytest.raises(UserError, match=message):
            run_convert("--hf-path", *flags, "--mlx-path", out)
        assert not out.exists() and not leftovers(tmp_path)


def test_layers_the_group_size_does_not_divide_stay_float(sharded, make_checkpoint, tmp_path, capsys):
    run_convert("--hf-path", sharded[0], "--mlx-path", tmp_path / "out", "-q", "--q-group-size", 128)
    assert "26 layers stay float32" in capsys.readouterr().out  # all but the 4 down_proj (input 128)
    model, tokenizer, _ = utils.load(str(tmp_path / "out"))
    assert isinstance(model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert type(model.layers[0].mlp.up_proj) is nn.Linear
    assert np.isfinite(np.array(model(mx.array([tokenizer.encode(PROMPT)])).astype(mx.float32))).all()
    narrow, _ = make_checkpoint("llama", intermediate_size=96)
    with pytest.raises(UserError, match="--q-group-size 128: no layer's input size is a multiple of it"):
        run_convert("--hf-path", narrow, "--mlx-path", tmp_path / "none", "-q", "--q-group-size", 128)
    assert not (tmp_path / "none").exists()


def test_existing_output_needs_force(sharded, tmp_path):
    source, _ = sharded
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty .*--force"):
        run_convert("--hf-path", source, "--mlx-path", out)
    # --force replaces a model folder alone
    with pytest.raises(UserError, match="holds keep.txt: not a model folder"):
        run_convert("--hf-path", source, "--mlx-path", out, "--force")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    run_convert("--hf-path", source, "--mlx-path", out)
    (out / "config.json").write_text("{}")
    run_convert("--hf-path", source, "--mlx-path", out, "--force")
    assert utils.read_json(out / "config.json") and not leftovers(tmp_path)
    # --force never replaces the source, a folder holding it, or the current folder
    for source, target in ((out, out), (out, tmp_path)):
        with pytest.raises(UserError, match=f"--mlx-path {target}: holds {source}, which replacing it would delete"):
            run_convert("--hf-path", source, "--mlx-path", target, "--force")
    assert (out / "config.json").exists()


def test_interrupted_conversion_leaves_nothing(sharded, tmp_path, monkeypatch):
    writes = []

    def save_then_fail(path, *args, **kwargs):
        writes.append(path)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return mx_save(path, *args, **kwargs)

    mx_save = mx.save_safetensors
    monkeypatch.setattr(mx, "save_safetensors", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        run_convert("--hf-path", sharded[0], "--mlx-path", tmp_path / "out", "--max-shard-size", 150e-6)
    assert len(writes) == 2 and not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_command_line(tmp_path):
    def cli(*flags):
        return subprocess.run([sys.executable, str(ROOT / "convert.py"), *map(str, flags)],
                              capture_output=True, text=True, check=False)

    result = cli("--hf-path", tmp_path / "missing", "--mlx-path", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"convert.py: error: --hf-path {tmp_path / 'missing'}: no such file or folder"]
    result = cli("--hf-path", tmp_path, "-q", "--q-bits", "7")
    assert result.returncode == 2 and "argument --q-bits: invalid choice: 7" in result.stderr
    result = cli("--hf-path", tmp_path, "-q", "--q-group-size", "16")
    assert result.returncode == 2 and "argument --q-group-size: invalid choice: 16" in result.stderr


def test_random_checkpoint_of_a_real_shape_converts_in_shards(tmp_path, capsys):
    """SmolLM2-135M's shape, written in several shards with random weights, converts to 4-bit with one
    scale and bias per 64 weights, and the quantized model loads; random_checkpoint.py --quantize writes the same
    quantized folder directly."""
    import transformers

    random_checkpoint.write(tmp_path / "src", "smollm2-135m", "bfloat16", shard_bytes=100 * 10**6)
    assert len(list((tmp_path / "src").glob("*.safetensors"))) == 3
    config = transformers.AutoConfig.from_pretrained(tmp_path / "src")  # a config transformers reads
    assert (config.hidden_size, config.num_hidden_layers) == (576, 30)
    mx.clear_cache()
    mx.reset_peak_memory()
    run_convert("--hf-path", tmp_path / "src", "--mlx-path", tmp_path / "q4", "-q", "--max-shard-size", 0.03)
    # one tensor at a time, one output shard at most: far below the 270 MB of the source
    assert mx.get_peak_memory() < 140e6
    tensors = stored(tmp_path / "q4")
    assert len(list((tmp_path / "q4").glob("*.safetensors"))) >= 3
    assert tensors["model.embed_tokens.scales"].shape == (49152, 576 // 64)
    assert tensors["model.embed_tokens.scales"].dtype == mx.bfloat16
    model, tokenizer, _ = utils.load(str(tmp_path / "q4"))
    assert model.layers[29].mlp.gate_proj.bits == 4 and model.model.embed_tokens.bits == 8
    run_convert("--hf-path", tmp_path / "src", "--mlx-path", tmp_path / "uniform", "-q", "--q-embedding-bits", 4)
    assert json.loads((tmp_path / "uniform" / "config.json").read_text())["quantization"] == {
        "group_size": 64, "bits": 4, "mode": "affine"}
    assert utils.load(str(tmp_path / "uniform"))[0].model.embed_tokens.bits == 4
    assert np.isfinite(np.array(model(mx.array([tokenizer.encode(PROMPT)])).astype(mx.float32))).all()
    random_checkpoint.write(tmp_path / "direct", "smollm2-135m", "bfloat16", quantize=True)
    direct = stored(tmp_path / "direct")
    assert sorted(direct) == sorted(tensors) and all(mx.array_equal(direct[k], v) for k, v in tensors.items())
    assert json.loads((tmp_path / "direct" / "config.json").read_text())["quantization"] == json.loads(
        (tmp_path / "q4" / "config.json").read_text())["quantization"]
