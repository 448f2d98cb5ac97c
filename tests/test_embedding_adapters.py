"""Adapters on the embedding (embed_tokens) and the output layer (lm_head), as PEFT's: their logits, PEFT's folders
both ways, fusing, training (LoRA and QLoRA), a tied output layer, the tokenizer saved beside them, GGUF adapters."""
import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import FP32_ATOL, copy_of, logits, randomized, run_fuse, run_lora, torch_logits, val_losses

import convert
import lora
import models
import utils
from utils import UserError

TARGETS = ["embed_tokens", "lm_head", "q_proj"]
PROMPT = "Q: the team when year is 7\nA: SELECT team FROM t WHERE year = 7"


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base(make_checkpoint, request):
    folder, reference = make_checkpoint("llama", tie_word_embeddings=request.param)
    tokens = utils.load(str(folder))[1].encode(PROMPT)
    return folder, reference, tokens


def random_adapters(folder, adapter_file):
    """Adapters of TARGETS on the last 2 layers, as lora.py makes them (an untrained one changes nothing), then
    random, saved; the adapted model."""
    model = utils.load(str(folder))[0]
    model.freeze()
    tokens = mx.array([[1, 5, 7, 9]])
    before = model(tokens)
    models.linear_to_lora_layers(model, TARGETS, 2, rank=4, scale=2.0)
    assert isinstance(model.model.embed_tokens, models.LoRAEmbedding)
    assert mx.array_equal(model(tokens), before)  # PEFT's start: the embedding's lora_a zero
    mx.random.seed(1)
    for layer in models.lora_layers(model).values():
        layer.lora_a = 0.1 * mx.random.normal(layer.lora_a.shape)
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    utils.save_adapters(adapter_file, model, {"fine_tune_type": "lora", "num_layers": 2,
                                              "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}})
    return model


def test_our_adapters_give_peft_our_logits_read_back_and_fuse(base, tmp_path):
    """PEFT's lora.Embedding and lora.Linear on the same weights compute our logits (a tied output layer sharing the
    embedding's adapter: ensure_weight_tying); the PEFT folder reads back; the fused model (still tied where it was)
    computes them too, here and in transformers."""
    import torch
    import transformers
    from peft import PeftModel

    folder, reference, tokens = base
    tied = reference.config.tie_word_embeddings
    adapted = random_adapters(folder, tmp_path / "adapters.safetensors")
    expected = logits(adapted, tokens)
    assert np.abs(expected - torch_logits(reference, tokens)).max() > 0.1
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--export-peft", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is tied
    assert {"model.embed_tokens", "lm_head"} & set(config["target_modules"]) == (
        {"model.embed_tokens"} if tied else {"model.embed_tokens", "lm_head"})
    theirs = PeftModel.from_pretrained(copy_of(reference), tmp_path / "peft").eval()
    assert np.abs(torch_logits(theirs, tokens) - expected).max() <= FP32_ATOL

    ours = utils.load(str(folder))[0]
    utils.load_adapters(ours, tmp_path / "peft")
    assert np.abs(logits(ours, tokens) - expected).max() <= FP32_ATOL

    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--save-path", tmp_path / "fused")
    assert json.loads((tmp_path / "fused" / "config.json").read_text()).get("tie_word_embeddings", False) is tied
    fused = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    assert np.abs(torch_logits(fused, tokens) - expected).max() <= FP32_ATOL
    assert np.abs(logits(utils.load(str(tmp_path / "fused"))[0], tokens) - expected).max() <= FP32_ATOL


@pytest.mark.parametrize("model_type, config", [
    ("gemma3_text", {"head_dim": 32, "sliding_window": 16}),  # tied; its embedding scaled inside the layer
    ("mistral3", {"head_dim": 32}),  # a vision-language model: the language model's paths in PEFT's names
    ("falcon_h1", {"head_dim": 32, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_state": 16, "mamba_n_groups": 2,
                   "mamba_d_conv": 4, "mamba_chunk_size": 16, "embedding_multiplier": 2.0, "lm_head_multiplier": 0.5}),
])
def test_families_embeddings_give_peft_our_logits(make_checkpoint, tmp_path, model_type, config):
    """Families whose embedding or output layer is scaled, or named otherwise in transformers."""
    from peft import PeftModel

    folder, reference = make_checkpoint(model_type, **config)
    tokens = utils.load(str(folder))[1].encode(PROMPT)
    expected = logits(random_adapters(folder, tmp_path / "adapters.safetensors"), tokens)
    assert np.abs(expected - torch_logits(reference, tokens)).max() > 0.1
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--export-peft", tmp_path / "peft")
    theirs = PeftModel.from_pretrained(copy_of(reference), tmp_path / "peft").eval()
    assert np.abs(torch_logits(theirs, tokens) - expected).max() <= FP32_ATOL


def test_peft_s_own_adapters_load_here(base, tmp_path):
    """Adapters PEFT made (its base_layer copies of the weights saved beside, as save_pretrained does for
    embeddings) give our model PEFT's logits; on a tied model, those PEFT made without ensure_weight_tying (the
    output layer not adapted) or of lm_head alone are refused in one line."""
    import torch
    from peft import LoraConfig, get_peft_model

    folder, reference, tokens = base
    tied = reference.config.tie_word_embeddings
    theirs = randomized(get_peft_model(copy_of(reference), LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, ensure_weight_tying=tied, task_type="CAUSAL_LM")).eval(), ["lora_"])
    theirs.save_pretrained(tmp_path / "peft")
    ours = utils.load(str(folder))[0]
    utils.load_adapters(ours, tmp_path / "peft")
    assert isinstance(ours.model.embed_tokens, models.LoRAEmbedding)
    assert np.abs(logits(ours, tokens) - torch_logits(theirs, tokens)).max() <= FP32_ATOL
    if not tied:  # PEFT's copy of a resized embedding (new tokens): refused
        from safetensors.torch import load_file, save_file

        saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
        saved["base_model.model.model.embed_tokens.base_layer.weight"] = torch.zeros(308, 64)
        save_file(saved, tmp_path / "peft" / "adapter_model.safetensors")
        with pytest.raises(UserError, match="made for a vocabulary of 308 tokens"):
            utils.load_adapters(utils.load(str(folder))[0], tmp_path / "peft")
        return
    for targets, error in ((TARGETS, "without ensure_weight_tying"), (["lm_head"], "adapts lm_head apart")):
        untied = get_peft_model(copy_of(reference), LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
        untied.save_pretrained(tmp_path / "untied")
        with pytest.raises(UserError, match=error):
            utils.load_adapters(utils.load(str(folder))[0], tmp_path / "untied")


def test_training_lowers_the_loss_saves_the_tokenizer_and_resumes(base, tmp_path, data_dir, capsys):
    """Training embed_tokens and lm_head (alone: the frozen layers below are then cached, the embedding's not)
    lowers the validation loss; the adapter config lists them; the tokenizer is saved beside the adapters and
    --test uses it (one with more tokens than the model is refused); a resumed run ends where the whole did."""
    folder, reference, _ = base
    flags = ["--model", folder, "--data", data_dir, "--train", "--iters", 8, "--save-every", 4, "--lora-rank", 4,
             "--lora-layers", 2, "--lora-targets", "embed_tokens", "lm_head", "--learning-rate", 1e-3,
             "--steps-per-eval", 8, "--eval-on-start", "--val-batches", 2]
    out = run_lora(capsys, *flags, "--adapter-file", tmp_path / "adapters.safetensors")
    losses = val_losses(out)
    assert losses[8] < losses[1] - 0.05
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    keys = ["embed_tokens"] if reference.config.tie_word_embeddings else ["embed_tokens", "lm_head"]
    assert config["lora_parameters"]["keys"] == keys and config["num_layers"] == 0
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer_config.json").exists()
    out = run_lora(capsys, "--model", folder, "--data", data_dir, "--test", "--test-batches", 1,
                   "--adapter-file", tmp_path / "adapters.safetensors")
    assert f"Using the tokenizer beside the adapters, in {tmp_path}" in out

    run_lora(capsys, *flags, "--adapter-file", tmp_path / "resumed.safetensors",
             "--resume", tmp_path / "runs" / "1" / "step-0000004")
    resumed, whole = mx.load(str(tmp_path / "resumed.safetensors")), mx.load(str(tmp_path / "adapters.safetensors"))
    assert set(resumed) == set(whole) and all(np.abs(np.array(resumed[k] - whole[k])).max() < 1e-6 for k in whole)

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.add_tokens([f"<new{i}>" for i in range(8)])
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="more than the model's vocabulary of 300"):
        run_lora(capsys, "--model", folder, "--data", data_dir, "--test", "--adapter-file",
                 tmp_path / "adapters.safetensors")


def test_frozen_layers_cached_below_an_output_layer_adapter_alone(tiny_llama, data_dir, tmp_path, capsys):
    """Every decoder layer is frozen below an adapter of the output layer alone: computed once, they train it as
    computing them at every step does; an adapter of the embedding leaves none frozen."""
    model = utils.load(str(tiny_llama))[0]
    model.freeze()
    models.linear_to_lora_layers(model, ["lm_head"], 1, rank=4)
    assert lora.first_trained_layer(model) == len(model.layers)
    models.linear_to_lora_layers(model, ["embed_tokens"], 1, rank=4)
    assert lora.first_trained_layer(model) == 0

    trained = []
    for cached in ("--cache-frozen-layers", "--no-cache-frozen-layers"):
        out = run_lora(capsys, "--model", tiny_llama, "--data", data_dir, "--train", "--iters", 16, "--lora-layers", 2,
                       "--lora-targets", "lm_head", "--learning-rate", 1e-3, cached,
                       "--adapter-file", tmp_path / f"{cached}.safetensors")
        assert ("Computing the frozen layers 0-3 once" in out) == (cached == "--cache-frozen-layers")
        trained.append(mx.load(str(tmp_path / f"{cached}.safetensors")))
    assert all(np.allclose(trained[0][k], trained[1][k], atol=1e-5) for k in trained[0])


def test_qlora_on_a_quantized_embedding_and_output_layer(tiny_llama, tmp_path, data_dir, capsys):
    """On a model whose embedding and output layer are quantized: training lowers the loss, and the fused model
    (re-quantized) computes the adapted model's logits but for the rounding."""
    convert.convert(convert.build_parser().parse_args(
        ["--hf-path", str(tiny_llama), "--mlx-path", str(tmp_path / "q8"), "-q", "--q-bits", "8", "--q-group-size",
         "32"]))
    quantized = utils.load(str(tmp_path / "q8"))[0]
    assert "scales" in quantized.model.embed_tokens and "scales" in quantized.lm_head
    out = run_lora(capsys, "--model", tmp_path / "q8", "--data", data_dir, "--train", "--iters", 6, "--lora-rank", 4,
                   "--lora-layers", 2, "--lora-targets", "embed_tokens", "lm_head", "q_proj", "--learning-rate", 1e-3,
                   "--steps-per-eval", 6, "--eval-on-start", "--val-batches", 2,
                   "--adapter-file", tmp_path / "adapters.safetensors")
    losses = val_losses(out)
    assert losses[6] < losses[1] - 0.05
    adapted = utils.load(str(tmp_path / "q8"))[0]
    utils.load_adapters(adapted, tmp_path / "adapters.safetensors")
    tokens = utils.load(str(tmp_path / "q8"))[1].encode(PROMPT)
    expected = logits(adapted, tokens)
    run_fuse("--model", tmp_path / "q8", "--adapter-file", tmp_path / "adapters.safetensors",
             "--save-path", tmp_path / "fused")
    fused = utils.load(str(tmp_path / "fused"))[0]
    assert "scales" in fused.model.embed_tokens and "scales" in fused.lm_head
    base_error = np.abs(logits(quantized, tokens) - expected).max()
    assert np.abs(logits(fused, tokens) - expected).max() < 0.1 * base_error


def test_gguf_adapter_of_the_embedding_and_output_layer(base, tmp_path):
    """token_embd's LoRA as llama.cpp's converter writes it (lora_a [vocabulary, rank]), output's as any layer's;
    a tied embedding's is refused (llama.cpp would adapt the input alone)."""
    import gguf

    folder, reference, _ = base
    random_adapters(folder, tmp_path / "adapters.safetensors")
    flags = ["--model", folder, "--adapter-file", tmp_path / "adapters.safetensors",
             "--export-gguf-adapter", tmp_path / "adapter.gguf"]
    if reference.config.tie_word_embeddings:
        with pytest.raises(UserError, match="--export-gguf-adapter: model.embed_tokens: llama.cpp applies"):
            run_fuse(*flags)
        return
    run_fuse(*flags)
    adapters = mx.load(str(tmp_path / "adapters.safetensors"))
    tensors = {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape)])
               for t in gguf.GGUFReader(tmp_path / "adapter.gguf").tensors}
    assert np.allclose(tensors["token_embd.weight.lora_a"], np.array(adapters["model.embed_tokens.lora_a"]))
    assert np.allclose(tensors["token_embd.weight.lora_b"], np.array(adapters["model.embed_tokens.lora_b"]).T)
    assert np.allclose(tensors["output.weight.lora_a"], np.array(adapters["lm_head.lora_a"]).T)
    assert tensors["output.weight.lora_b"].shape == (300, 4)


def test_dora_of_the_embedding_and_output_layer_is_peft_s(base, tmp_path, data_dir, capsys):
    """DoRA (PEFT's DoraEmbeddingLayer: a magnitude per embedding dimension) trains, and its export gives PEFT our
    logits; on a tied embedding (PEFT gives the output layer magnitudes of its own) it is refused in one line."""
    from peft import PeftModel

    folder, reference, tokens = base
    flags = ["--model", folder, "--data", data_dir, "--train", "--iters", 2, "--lora-layers", 2, "--fine-tune-type",
             "dora", "--lora-targets", "embed_tokens", "lm_head", "--learning-rate", 1e-2, "--val-batches", 0,
             "--adapter-file", tmp_path / "adapters.safetensors"]
    if reference.config.tie_word_embeddings:
        with pytest.raises(UserError, match="--fine-tune-type dora: model.embed_tokens: DoRA of an embedding that"):
            run_lora(capsys, *flags)
        return
    run_lora(capsys, *flags)
    assert set(mx.load(str(tmp_path / "adapters.safetensors"))) == {
        f"{path}.{name}" for path in ("model.embed_tokens", "lm_head") for name in ("lora_a", "lora_b", "m")}
    adapted = utils.load(str(folder))[0]
    utils.load_adapters(adapted, tmp_path / "adapters.safetensors")
    expected = logits(adapted, tokens)
    assert np.abs(expected - torch_logits(reference, tokens)).max() > 1e-3
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--export-peft", tmp_path / "peft",
             "--save-path", tmp_path / "fused")
    theirs = PeftModel.from_pretrained(copy_of(reference), tmp_path / "peft").eval()
    assert np.abs(torch_logits(theirs, tokens) - expected).max() <= FP32_ATOL
    assert np.abs(logits(utils.load(str(tmp_path / "fused"))[0], tokens) - expected).max() <= FP32_ATOL
