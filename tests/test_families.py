"""Each family besides Llama through every script: LoRA training lowers the loss, convert -q quantizes it,
fuse.py writes a model that transformers reads with the adapters' logits; Phi-3-vision's image encoder is
kept untouched; --list-targets."""
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import (ALL_TARGETS, FP32_ATOL, copy_of, logits, random_adapter, run_fuse, run_lora, torch_logits,
                      val_losses)
from mlx import nn

import convert
import models
import utils

PROMPT = "Q: the team when year is 7\nA: SELECT team FROM t WHERE year = 7"
ATTENTION = ALL_TARGETS[:4]
# dense and mixture of experts layers alternating, as in Llama 4 Maverick
LLAMA4 = {"head_dim": 16, "intermediate_size": 32, "intermediate_size_mlp": 128, "num_local_experts": 4,
          "num_experts_per_tok": 2, "interleave_moe_layer_step": 2, "no_rope_layer_interval": 2,
          "attention_chunk_size": 16, "floor_scale": 4}
# model_type: (config, LoRA targets covering each kind of linear layer it has)
FAMILIES = {
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2},
                ["self_attn.q_proj", "block_sparse_moe.gate", "experts.*.w1", "w2", "block_sparse_moe.experts.3.w3"]),
    "qwen2": ({"tie_word_embeddings": True}, ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.down_proj"]),
    "gemma": ({"head_dim": 32}, ["self_attn.q_proj", "self_attn.v_proj", "gate_proj", "up_proj"]),
    "phi": ({"partial_rotary_factor": 0.4}, ["q_proj", "v_proj", "dense", "fc1", "fc2"]),
    "phi3": ({}, ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
    "qwen3": ({"head_dim": 32, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}, ALL_TARGETS),
    "gemma2": ({"head_dim": 32, "sliding_window": 16, "final_logit_softcapping": 5.0}, ALL_TARGETS),
    "gemma3_text": ({"head_dim": 32, "sliding_window": 16, "sliding_window_pattern": 2}, ALL_TARGETS),
    "smollm3": ({"no_rope_layer_interval": 2}, ALL_TARGETS),
    "olmo2": ({}, ALL_TARGETS),
    "olmo3": ({"sliding_window": 16}, ALL_TARGETS),
    "granite": ({"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.1,
                 "logits_scaling": 4.0}, ALL_TARGETS),
    "ministral": ({"head_dim": 16, "sliding_window": 16,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, ALL_TARGETS),
    # the stacked experts and the routers are no linear layers: attention is what these two can adapt
    # (logits_scaling, which test_models covers, slows the loss's fall too much for attention's adapters alone)
    "granitemoe": ({"num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 2.0,
                    "residual_multiplier": 0.5, "attention_multiplier": 0.1, "tie_word_embeddings": True},
                   ATTENTION),
    "gpt_oss": ({"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16,
                 "swiglu_limit": 0.6}, ATTENTION),
    "llama4_text": (LLAMA4, ATTENTION + ["shared_expert.gate_proj", "shared_expert.up_proj",
                                        "shared_expert.down_proj", "feed_forward.gate_proj",
                                        "feed_forward.up_proj", "feed_forward.down_proj"]),
}
# Phi-3-vision's image encoder and projection, as its checkpoint names them (shapes shrunk)
VISION_SHAPES = {
    "model.vision_embed_tokens.glb_GN": (1, 1, 256),
    "model.vision_embed_tokens.sub_GN": (1, 1, 1, 256),
    "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight": (32, 3, 14, 14),
    "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight": (128, 32),
    "model.vision_embed_tokens.img_projection.0.weight": (64, 256),
    "model.vision_embed_tokens.img_projection.0.bias": (64,),
}


@pytest.fixture(scope="module")
def family(request, make_checkpoint):
    config, targets = FAMILIES[request.param]
    folder, reference = make_checkpoint(request.param, **config)
    return folder, reference, targets, utils.load(str(folder))[1].encode(PROMPT)


@pytest.fixture(scope="module")
def phi3_vision(make_checkpoint, tmp_path_factory):
    """A Phi-3 checkpoint made into Phi-3-vision's layout: model_type phi3_v, and image encoder weights."""
    import shutil

    folder, reference = make_checkpoint("phi3")
    vision = tmp_path_factory.mktemp("phi3_v")
    shutil.copytree(folder, vision, dirs_exist_ok=True)
    config = json.loads((vision / "config.json").read_text())
    config.update(model_type="phi3_v", architectures=["Phi3VForCausalLM"],
                  embd_layer={"embedding_cls": "image", "hd_transform_order": "sub_glb"},
                  img_processor={"model_name": "openai/clip-vit-large-patch14-336", "image_dim_out": 32})
    (vision / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    weights = {k: mx.array(rng.normal(size=s).astype(np.float32)) for k, s in VISION_SHAPES.items()}
    mx.save_safetensors(str(vision / "vision.safetensors"), weights)
    return vision, reference, weights


def v4_layout(config: dict) -> dict:
    config = dict(config)
    rope = config.pop("rope_parameters")
    if "full_attention" in rope:
        local = rope["sliding_attention"]
        config["rope_local_base_freq"] = local["rope_theta"]  # Gemma 3's name; OLMo 3 keeps its default
        rope = rope["full_attention"]
    rope = dict(rope)
    config["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    config["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    if config.get("sliding_window") and "qwen" not in config["model_type"] and config["model_type"] != "smollm3":
        config.pop("layer_types", None)  # derived from the family's pattern again
    return config


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_transformers_4_layout_reads_as_transformers_reads_it(family, tmp_path):
    """The same checkpoint with transformers 4's config layout: transformers 5 and we read it alike."""
    import shutil

    import transformers

    folder, _, _, tokens = family
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = v4_layout(json.loads((folder / "config.json").read_text()))
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert np.abs(logits(utils.load(str(tmp_path))[0], tokens) - torch_logits(reference, tokens)).max() <= FP32_ATOL


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_lora_lowers_the_loss(family, data_dir, tmp_path, capsys):
    folder, _, targets, _ = family
    adapters = tmp_path / "adapters.safetensors"
    # 5e-3: at 1e-2 the validation loss of one family's random model (Qwen2, tied embeddings) stalls
    out = run_lora(capsys, "--model", folder, "--data", data_dir, "--train", "--iters", 10, "--batch-size", 4,
                   "--learning-rate", 5e-3, "--lora-layers", 2, "--lora-rank", 4, "--lora-alpha", 8,
                   "--steps-per-eval", 10, "--val-batches", -1, "--adapter-file", adapters,
                   "--lora-targets", *targets)
    losses = val_losses(out)
    assert losses[10] < losses[1] - 0.3, out
    saved = {k.split(".", 3)[3].rsplit(".", 1)[0] for k in mx.load(str(adapters))}
    for target in targets:  # each target adapted something
        assert any(models.target_matches(path, target) for path in saved), (target, saved)


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_fused_model_loads_in_transformers(family, tmp_path):
    import transformers

    folder, reference, targets, tokens = family
    assert np.abs(logits(utils.load(str(folder))[0], tokens) - torch_logits(reference, tokens)).max() <= FP32_ATOL
    adapted = random_adapter(folder, tmp_path / "adapters.safetensors", targets)
    expected = logits(adapted, tokens)
    assert np.abs(expected - torch_logits(reference, tokens)).max() > 0.1  # the adapters matter
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--save-path", tmp_path / "fused",
             "--export-peft", tmp_path / "peft")
    fused = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    assert np.abs(torch_logits(fused, tokens) - expected).max() <= FP32_ATOL
    if "mixtral" not in str(folder):  # transformers 5 holds Mixtral's experts and router as one tensor each
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(copy_of(reference), tmp_path / "peft").eval()
        assert np.abs(torch_logits(peft_model, tokens) - expected).max() <= FP32_ATOL


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_quantized_conversion_and_fuse(family, tmp_path):
    """convert -q quantizes every linear layer (experts too), except Mixtral's router; fuse.py re-quantizes."""
    folder, reference, targets, tokens = family
    convert.convert(convert.build_parser().parse_args(
        ["--hf-path", str(folder), "--mlx-path", str(tmp_path / "q8"), "-q", "--q-bits", "8", "--q-group-size", "32"]))
    quantized, _, _ = utils.load(str(tmp_path / "q8"))
    kinds = {path: type(m) for path, m in quantized.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert all(issubclass(kind, (nn.QuantizedLinear, nn.QuantizedEmbedding)) == (not path.endswith(".gate"))
               for path, kind in kinds.items()), kinds
    exact = torch_logits(reference, tokens)
    error = np.abs(logits(quantized, tokens) - exact)  # on average: an expert chosen differently is a jump
    assert 0 < error.mean() < 0.1 * np.abs(exact).mean()

    adapted = random_adapter(tmp_path / "q8", tmp_path / "adapters.safetensors", targets)
    expected = logits(adapted, tokens)
    run_fuse("--model", tmp_path / "q8", "--adapter-file", tmp_path / "adapters.safetensors",
             "--save-path", tmp_path / "fused")
    fused, _, _ = utils.load(str(tmp_path / "fused"))
    assert not models.lora_layers(fused)
    assert np.abs(logits(fused, tokens) - expected).mean() < 0.2 * np.abs(expected - logits(quantized, tokens)).mean()


def test_phi3_vision_trains_text_only_and_keeps_the_image_encoder(phi3_vision, data_dir, tmp_path, capsys):
    folder, reference, vision = phi3_vision
    model, tokenizer, _ = utils.load(str(folder))
    tokens = tokenizer.encode(PROMPT)
    assert np.abs(logits(model, tokens) - torch_logits(reference, tokens)).max() <= FP32_ATOL

    # the tutorial's recipe: LoRA on self_attn.qkv_proj (the default for Phi-3)
    adapters = tmp_path / "adapters.safetensors"
    out = run_lora(capsys, "--model", folder, "--data", data_dir, "--train", "--iters", 30, "--lora-layers", 2,
                   "--lora-rank", 16, "--lora-alpha", 32, "--learning-rate", 1e-2, "--steps-per-eval", 30, "--val-batches", -1,
                   "--adapter-file", adapters)
    losses = val_losses(out)
    assert losses[30] < losses[1] - 0.3, out
    assert sorted(mx.load(str(adapters))) == [f"model.layers.{i}.self_attn.qkv_proj.lora_{ab}"
                                              for i in (2, 3) for ab in "ab"]

    run_fuse("--model", folder, "--adapter-file", adapters, "--save-path", tmp_path / "fused")
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["model_type"] == "phi3_v"
    written = mx.load(str(tmp_path / "fused" / "model.safetensors"))
    for name, value in vision.items():
        assert np.array_equal(written[name], value), name
    fused, _, _ = utils.load(str(tmp_path / "fused"))
    adapted, _, _ = utils.load(str(folder))
    adapted.freeze()
    utils.load_adapters(adapted, adapters)
    assert np.abs(logits(fused, tokens) - logits(adapted, tokens)).max() <= FP32_ATOL

    # convert -q leaves the image encoder as it is
    convert.convert(convert.build_parser().parse_args(
        ["--hf-path", str(folder), "--mlx-path", str(tmp_path / "q4"), "-q", "--q-group-size", "32"]))
    written = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    assert all(np.array_equal(written[name], value) for name, value in vision.items())
    assert "model.layers.0.self_attn.qkv_proj.scales" in written


def test_list_targets(make_checkpoint, capsys):
    folder, _ = make_checkpoint("mixtral", **FAMILIES["mixtral"][0])
    out = run_lora(capsys, "--list-targets", folder)
    lines = [line.split() for line in out.splitlines()[1:]]
    assert [line[0] for line in lines[:6]] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "block_sparse_moe.gate",
                                              "block_sparse_moe.experts.0.w1"]
    assert lines[0][1:] == ["64", "->", "64", "(default)"] and lines[4][1:] == ["64", "->", "4"]
    assert len(lines) == 4 + 1 + 4 * 3


def test_list_targets_of_layers_that_differ(make_checkpoint, capsys):
    """Llama 4's dense layers and mixture of experts layers: the linear layers of both, once each; neither the
    router nor the stacked experts, which are no linear layers."""
    folder, _ = make_checkpoint("llama4_text", **LLAMA4)
    out = run_lora(capsys, "--list-targets", folder)
    lines = [line.split() for line in out.splitlines()[1:]]
    assert [line[0] for line in lines] == [f"self_attn.{p}_proj" for p in "qkvo"] + [
        f"feed_forward.{p}_proj" for p in ("gate", "up", "down")] + [
        f"feed_forward.shared_expert.{p}_proj" for p in ("gate", "up", "down")]
    assert lines[4][1:] == ["64", "->", "128"] and lines[7][1:] == ["64", "->", "32"]
