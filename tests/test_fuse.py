"""fuse.py and adapter interoperability: fused models in transformers, adapters to and from PEFT, mlx-lm
adapter folders, and bad adapters."""
import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import (ALL_TARGETS, FP32_ATOL, FakeHub, copy_of, logits, mlx_lm_adapter, random_adapter, randomized,
                      run_fuse, run_lora, torch_logits)
from mlx import nn

import convert
import models
import utils
from utils import UserError

PROMPT = "Q: the team when year is 7\nA: SELECT team FROM t WHERE year = 7"


@pytest.fixture(scope="module")
def base(make_checkpoint):
    folder, reference = make_checkpoint("llama")
    tokens = utils.load(str(folder))[1].encode(PROMPT)
    return folder, reference, tokens


def test_fused_model_loads_in_transformers_with_the_adapters_logits(base, tmp_path):
    import transformers

    folder, reference, tokens = base
    adapted = random_adapter(folder, tmp_path / "adapters.safetensors")
    expected = logits(adapted, tokens)
    assert np.abs(expected - torch_logits(reference, tokens)).max() > 0.1  # the adapters matter
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors",
             "--save-path", tmp_path / "fused")
    fused = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    assert np.abs(torch_logits(fused, tokens) - expected).max() <= FP32_ATOL
    ours, _, _ = utils.load(str(tmp_path / "fused"))
    assert not models.lora_layers(ours) and np.abs(logits(ours, tokens) - expected).max() <= FP32_ATOL


def test_fusing_into_a_quantized_base(base, tmp_path):
    """Re-quantized with the base's own bits and group size, or saved in float16 with --de-quantize."""
    import transformers

    folder, _, tokens = base
    convert.convert(convert.build_parser().parse_args(
        ["--hf-path", str(folder), "--mlx-path", str(tmp_path / "q8"), "-q", "--q-bits", "8", "--q-group-size", "32"]))
    adapted = random_adapter(tmp_path / "q8", tmp_path / "adapters.safetensors")
    expected = logits(adapted, tokens)
    run_fuse("--model", tmp_path / "q8", "--adapter-file", tmp_path / "adapters.safetensors",
             "--save-path", tmp_path / "fused")
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    fused, _, _ = utils.load(str(tmp_path / "fused"))
    assert isinstance(fused.layers[3].self_attn.q_proj, nn.QuantizedLinear)
    base_error = np.abs(logits(utils.load(str(tmp_path / "q8"))[0], tokens) - expected).max()
    assert np.abs(logits(fused, tokens) - expected).max() < 0.1 * base_error  # 8-bit rounding of the sum

    run_fuse("--model", tmp_path / "q8", "--adapter-file", tmp_path / "adapters.safetensors",
             "--save-path", tmp_path / "fp16", "--de-quantize")
    assert "quantization" not in json.loads((tmp_path / "fp16" / "config.json").read_text())
    fp16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp16", dtype=torch.float32)
    assert next(iter(mx.load(str(tmp_path / "fp16" / "model.safetensors")).values())).dtype == mx.float16
    assert np.abs(torch_logits(fp16, tokens) - expected).max() < 0.1 * base_error


def test_export_to_peft(base, tmp_path):
    from peft import PeftModel

    folder, reference, tokens = base
    adapted = random_adapter(folder, tmp_path / "adapters.safetensors", rank=4, scale=2.0)
    # the export is what adapter_config.json records (the dropout it was trained with too)
    recorded = json.loads((tmp_path / "adapter_config.json").read_text())
    recorded["lora_parameters"]["dropout"] = 0.05
    (tmp_path / "adapter_config.json").write_text(json.dumps(recorded))
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors",
             "--export-peft", tmp_path / "peft", "--hf-path", "someone/tiny")
    assert not (tmp_path / "lora_fused_model").exists()  # only the export was asked for
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["base_model_name_or_path"]) == (
        4, 8.0, 0.05, "someone/tiny")
    peft_model = PeftModel.from_pretrained(copy_of(reference), tmp_path / "peft").eval()
    assert np.abs(torch_logits(peft_model, tokens) - logits(adapted, tokens)).max() <= FP32_ATOL


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapters_load_here(base, tmp_path, data_dir, capsys, rslora):
    """A PEFT LoRA on some layers and all kinds of targets: same logits here, and lora.py tests, resumes
    and fuse.py fuses with it."""
    from peft import LoraConfig, get_peft_model

    folder, reference, tokens = base
    model = copy_of(reference)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"],
                        layers_to_transform=[1, 3], use_rslora=rslora, task_type="CAUSAL_LM")
    peft_model = randomized(get_peft_model(model, config).eval())
    peft_model.save_pretrained(tmp_path / "peft")
    expected = torch_logits(peft_model, tokens)

    ours, _, _ = utils.load(str(folder))
    utils.load_adapters(ours, tmp_path / "peft")
    assert len(models.lora_layers(ours)) == 14
    assert np.abs(logits(ours, tokens) - expected).max() <= FP32_ATOL

    out = run_lora(capsys, "--model", folder, "--adapter-file", tmp_path / "peft", "--data", data_dir, "--test")
    assert "Test loss" in out
    run_fuse("--model", folder, "--adapter-file", tmp_path / "peft", "--save-path", tmp_path / "fused")
    assert np.abs(logits(utils.load(str(tmp_path / "fused"))[0], tokens) - expected).max() <= FP32_ATOL
    out = run_lora(capsys, "--model", folder, "--resume-adapter-file", tmp_path / "peft", "--train",
                   "--data", data_dir, "--iters", 2, "--adapter-file", tmp_path / "resumed.safetensors")
    assert set(mx.load(str(tmp_path / "resumed.safetensors"))) == {
        f"model.layers.{i}.{t}.lora_{ab}" for i in (1, 3) for t in ALL_TARGETS for ab in "ab"}


def test_bad_adapters_are_one_line_errors_leaving_nothing(base, make_checkpoint, tmp_path):
    folder, _, _ = base
    wider, _ = make_checkpoint("llama", hidden_size=128, intermediate_size=256)
    random_adapter(wider, tmp_path / "wider.safetensors", layers=1)
    deeper, _ = make_checkpoint("llama", num_hidden_layers=6)
    random_adapter(deeper, tmp_path / "deeper.safetensors", layers=1)
    (tmp_path / "no_config").mkdir()
    shutil.copy(tmp_path / "wider.safetensors", tmp_path / "no_config" / "adapters.safetensors")
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["k_proj"]}))
    transposed = tmp_path / "fan_in_fan_out"
    transposed.mkdir()
    (transposed / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "fan_in_fan_out": True}))
    cases = [
        (tmp_path / "wider.safetensors", r"does not fit this model: model.layers.3.mlp.down_proj.lora_a has shape \(256, 4\), the model.s is \(128, 4\)"),
        (tmp_path / "deeper.safetensors", r"layer model.layers.5.mlp.down_proj does not exist in this model \(made for another base\?\)"),
        (tmp_path / "no_config", "no adapter_config.json"),
        (ia3, "PEFT adapters of type IA3 are not supported"),
        (transposed, "fan_in_fan_out = True is not supported"),
        (tmp_path / "missing.safetensors", "no such file or folder"),
    ]
    for adapter, message in cases:
        with pytest.raises(UserError, match=message):
            run_fuse("--model", folder, "--adapter-file", adapter, "--save-path", tmp_path / "out",
                     "--export-peft", tmp_path / "peft_out")
        assert not (tmp_path / "out").exists() and not (tmp_path / "peft_out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_gguf(base, tmp_path):
    """An fp16 GGUF of the fused model: the gguf package reads it as llama.cpp's converter would write it,
    and utils.load gives the adapted model's logits back (to fp16 rounding) and the same tokenizer."""
    import gguf

    folder, _, tokens = base
    adapted = random_adapter(folder, tmp_path / "adapters.safetensors")
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--export-gguf",
             tmp_path / "fused.gguf")
    assert not (tmp_path / "lora_fused_model").exists()
    reader = gguf.GGUFReader(tmp_path / "fused.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 4
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 300
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert len(kinds) == 4 * 9 + 3

    loaded, tokenizer, _ = utils.load(str(tmp_path / "fused.gguf"))
    assert tokenizer.encode(PROMPT) == tokens
    expected = logits(adapted, tokens)
    error = np.abs(logits(loaded, tokens) - expected).max()
    assert error < 0.02 < np.abs(logits(utils.load(str(folder))[0], tokens) - expected).max()


def test_export_gguf_refuses_what_it_cannot_write(make_checkpoint, tmp_path):
    folder, _ = make_checkpoint("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    random_adapter(folder, tmp_path / "adapters.safetensors")
    with pytest.raises(UserError, match="--export-gguf: rope scaling 'dynamic' is not written as GGUF for llama"):
        run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--export-gguf",
                 tmp_path / "fused.gguf", "--save-path", tmp_path / "fused")
    assert not (tmp_path / "fused.gguf").exists() and not (tmp_path / "fused").exists()


def test_upload_names_the_base(base, tmp_path, monkeypatch):
    import huggingface_hub

    folder, _, _ = base
    random_adapter(folder, tmp_path / "adapters.safetensors")
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.chdir(tmp_path)  # the default adapters.safetensors and lora_fused_model/
    run_fuse("--model", folder, "--upload-name", "me/tiny-sql", "--hf-repo", "someone/tiny-llama")
    assert [c[0] for c in FakeHub.calls] == ["whoami", "create_repo", "upload_folder"]
    _, upload, files, card = FakeHub.calls[2]
    assert upload["folder_path"] == "lora_fused_model" and upload["repo_id"] == "me/tiny-sql"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert "base_model: someone/tiny-llama" in card


def test_adapters_both_ways_with_mlx_lm(base, tmp_path, data_dir, capsys):
    """Adapters trained by lora.py load in mlx-lm, and mlx-lm's load here, with the same logits."""
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.tuner.utils import load_adapters

    folder, _, tokens = base
    (tmp_path / "ours").mkdir()
    run_lora(capsys, "--model", folder, "--train", "--data", data_dir, "--iters", 3, "--learning-rate", 1e-2,
             "--lora-layers", 2, "--lora-targets", "q_proj", "v_proj", "down_proj",
             "--adapter-file", tmp_path / "ours" / "adapters.safetensors")
    ours, _, _ = utils.load(str(folder))
    utils.load_adapters(ours, tmp_path / "ours")
    theirs, _ = mlx_lm.load(str(folder))
    load_adapters(theirs, str(tmp_path / "ours"))
    expected = logits(ours, tokens)
    assert np.abs(expected - logits(utils.load(str(folder))[0], tokens)).max() > 1e-2  # trained: not zero
    assert np.abs(logits(theirs, tokens) - expected).max() <= FP32_ATOL

    theirs = mlx_lm_adapter(folder, tmp_path / "theirs")
    ours, _, _ = utils.load(str(folder))
    utils.load_adapters(ours, tmp_path / "theirs")
    assert np.abs(logits(ours, tokens) - logits(theirs, tokens)).max() <= FP32_ATOL


def peft_export_gives_our_logits(base, adapter_file, peft_folder):
    """The base model with these adapters computes logits that differ from the base's, and fuse.py's PEFT export
    of them (into peft_folder) gives PEFT the same logits."""
    from peft import PeftModel

    folder, reference, tokens = base
    adapted = utils.load(str(folder))[0]
    utils.load_adapters(adapted, adapter_file)
    expected = logits(adapted, tokens)
    assert np.abs(expected - torch_logits(reference, tokens)).max() > 1e-3  # the adapters matter
    run_fuse("--model", folder, "--adapter-file", adapter_file, "--export-peft", peft_folder)
    peft_model = PeftModel.from_pretrained(copy_of(reference), peft_folder).eval()
    assert np.abs(torch_logits(peft_model, tokens) - expected).max() <= FP32_ATOL


def test_rslora_scale_export_and_resume_are_peft_s(base, tmp_path, data_dir, capsys):
    """--use-rslora: the scale is alpha / sqrt(rank), PEFT's scaling for use_rslora; adapter_config.json records
    it, and the PEFT export carries use_rslora and the same alpha, whose adapters give PEFT our logits and read back
    as rsLoRA; --resume refuses a run that changes it."""
    from peft import LoraConfig, get_peft_model

    import lora

    folder, reference, tokens = base
    theirs = get_peft_model(copy_of(reference), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"],
                                                           use_rslora=True, task_type="CAUSAL_LM"))
    scaling = theirs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    flags = ["--model", folder, "--data", data_dir, "--train", "--iters", 2, "--lora-layers", 2, "--lora-rank", 4,
             "--lora-alpha", 16, "--learning-rate", 1e-2, "--val-batches", 1, "--eval-on-start", "--steps-per-eval",
             1000,
             "--adapter-file", tmp_path / "adapters.safetensors"]
    run_lora(capsys, *flags, "--use-rslora")
    params = json.loads((tmp_path / "adapter_config.json").read_text())["lora_parameters"]
    assert params["scale"] == pytest.approx(scaling) == 8.0 and params["use_rslora"] is True
    peft_export_gives_our_logits(base, tmp_path / "adapters.safetensors", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["lora_alpha"] == pytest.approx(16)
    run_fuse("--model", folder, "--adapter-file", tmp_path / "peft", "--export-peft", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["use_rslora"] is True and again["lora_alpha"] == pytest.approx(16)

    saved = vars(lora.parse_args([str(f) for f in flags + ["--use-rslora"]]))
    assert lora.changed_flags(saved, lora.parse_args([str(f) for f in flags])) == [
        "--use-rslora True (now False)", "the LoRA scale 8.0 (now 4.0)"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_as_peft_s_and_save_adapters_of_the_original_base(base, tmp_path, data_dir, capsys,
                                                                                 init):
    """--init-lora-weights pissa / olora: the adapters' start and the residual base weight are PEFT's; training
    saves adapters of the original weights (twice the rank, as PEFT converts them), which test as the trained model
    did, load in PEFT on the original model with our logits, and resume from a checkpoint exactly."""
    from peft import LoraConfig, get_peft_model

    folder, reference, tokens = base
    theirs = get_peft_model(copy_of(reference), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=init, task_type="CAUSAL_LM"))
    ours = utils.load(str(folder))[0]
    ours.freeze()
    models.linear_to_lora_layers(ours, ["q_proj", "v_proj"], -1, rank=4, scale=2.0)
    models.initialise_adapters(models.lora_layers(ours), init)
    for path, layer in models.lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(path)
        start = (peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight).detach().numpy()
        assert np.abs(np.array(layer.linear.weight) - peft_layer.base_layer.weight.detach().numpy()).max() < 1e-5
        assert np.abs(np.array((layer.lora_a @ layer.lora_b).T) - start).max() < 1e-5
        assert np.abs(start).max() > 0.05  # a share of the weight moved into the adapters
    assert np.abs(logits(ours, tokens) - torch_logits(reference, tokens)).max() <= FP32_ATOL  # starts as the base

    flags = ["--model", folder, "--data", data_dir, "--train", "--iters", 4, "--save-every", 2, "--lora-layers", -1,
             "--lora-rank", 4, "--lora-alpha", 8, "--learning-rate", 1e-2, "--val-batches", 1, "--eval-on-start",
             "--steps-per-eval",
             1000, "--test", "--test-batches", 2, "--init-lora-weights", init]
    out = run_lora(capsys, *flags, "--adapter-file", tmp_path / "adapters.safetensors")
    trained_loss = float(re.search(r"Test loss ([\d.]+)", out)[1])
    config = json.loads((tmp_path / "adapter_config.json").read_text())["lora_parameters"]
    assert (config["rank"], config["scale"]) == (8, 2.0)
    out = run_lora(capsys, "--model", folder, "--data", data_dir, "--test", "--test-batches", 2,
                   "--adapter-file", tmp_path / "adapters.safetensors")
    assert float(re.search(r"Test loss ([\d.]+)", out)[1]) == pytest.approx(trained_loss, abs=2e-3)
    peft_export_gives_our_logits(base, tmp_path / "adapters.safetensors", tmp_path / "peft")

    run_lora(capsys, *flags, "--adapter-file", tmp_path / "resumed.safetensors",
             "--resume", tmp_path / "runs" / "1" / "step-0000002")
    resumed, whole = mx.load(str(tmp_path / "resumed.safetensors")), mx.load(str(tmp_path / "adapters.safetensors"))
    assert all(np.abs(np.array(resumed[k] - whole[k])).max() < 1e-6 for k in whole)


def test_init_lora_weights_gaussian_and_on_a_quantized_base(base):
    """gaussian: A drawn with PEFT's standard deviation, 1/rank; PiSSA and OLoRA refuse a quantized layer."""
    folder, _, _ = base
    model = utils.load(str(folder))[0]
    models.quantize(model, lambda path, m: {"group_size": 32, "bits": 4} if path.endswith("v_proj") else None)
    models.linear_to_lora_layers(model, ["q_proj"], -1, rank=4)
    layers = models.lora_layers(model)
    models.initialise_adapters(layers, "gaussian")
    assert abs(np.std(np.concatenate([np.array(layer.lora_a) for layer in layers.values()])) - 0.25) < 0.02
    models.linear_to_lora_layers(model, ["v_proj"], 1, rank=4)
    for init in ("pissa", "olora"):
        with pytest.raises(ValueError, match="model.layers.3.self_attn.v_proj is quantized"):
            models.initialise_adapters(models.lora_layers(model), init)
