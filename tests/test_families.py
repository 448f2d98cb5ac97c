"""Each family besides Llama through every script: LoRA training lowers the loss, convert -q quantizes it,
fuse.py writes a model that transformers reads with the adapters' logits; the image encoders of Phi-3-vision,
Mistral 3 and Gemma 3 are kept untouched; --list-targets."""
import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import (ALL_TARGETS, DEEPSEEK, FP32_ATOL, copy_of, logits, random_adapter, run_fuse, run_lora,
                      torch_logits, transformers_class, val_losses)
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

import convert
import models
import utils

PROMPT = "Q: the team when year is 7\nA: SELECT team FROM t WHERE year = 7"
ATTENTION = ALL_TARGETS[:4]
# dense and mixture of experts layers alternating, as in Llama 4 Maverick
LLAMA4 = {"head_dim": 16, "intermediate_size": 32, "intermediate_size_mlp": 128, "num_local_experts": 4,
          "num_experts_per_tok": 2, "interleave_moe_layer_step": 2, "no_rope_layer_interval": 2,
          "attention_chunk_size": 16, "floor_scale": 4}
# Gemma 4's scores are unscaled products of normed queries and keys, which quantization's errors grow with the
# head's size: small heads. Every expert for every token: a router that chose another one for a token after
# quantization would make a jump that no error bound allows (test_models checks the choice).
GEMMA4 = {"head_dim": 8, "global_head_dim": 16, "sliding_window": 16, "vocab_size_per_layer_input": 300,
          "hidden_size_per_layer_input": 32, "num_kv_shared_layers": 1, "use_double_wide_mlp": True,
          "attention_k_eq_v": True, "num_global_key_value_heads": 1, "final_logit_softcapping": 5.0,
          "layer_types": ["sliding_attention", "full_attention"] * 2, "enable_moe_block": True, "num_experts": 4,
          "top_k_experts": 4, "moe_intermediate_size": 32}
GEMMA4_TARGETS = ALL_TARGETS + ["per_layer_input_gate", "per_layer_projection", "router.proj"]
LFM2_LAYERS = ["conv", "full_attention", "conv", "full_attention"]
LFM2_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "conv.in_proj",
                "conv.out_proj"]
# Qwen3-Next and Qwen3.5: three linear attention layers, then attention; small heads
GATED_DELTA = {"head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
               "linear_value_head_dim": 16}
QWEN_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64}
QWEN_MOE_TARGETS = ["mlp.gate", "experts.*.gate_proj", "experts.*.up_proj", "experts.*.down_proj",
                    "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj", "shared_expert_gate"]
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
    # logit_scale 1: at Cohere's 1/16 a tiny random model's logits are too flat to learn from in 10 steps
    "cohere": ({"use_qk_norm": True, "logit_scale": 1.0}, ALL_TARGETS),
    "cohere2": ({"sliding_window": 16, "logit_scale": 1.0}, ALL_TARGETS),
    "starcoder2": ({"sliding_window": 16}, ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]),
    "glm": ({"head_dim": 16, "pad_token_id": 0},
            ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
    "glm4": ({"head_dim": 16, "pad_token_id": 0},
             ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
    "ministral3": ({"head_dim": 16, "rope_parameters": {  # the queries scaled from position 4 on
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 4,
        "llama_4_scaling_beta": 0.1}}, ALL_TARGETS),
    "exaone4": ({"head_dim": 8, "sliding_window": 8, "sliding_window_pattern": 2}, ALL_TARGETS),
    "hunyuan_v1_dense": ({"head_dim": 16, "tie_word_embeddings": True, "rope_theta": 10000.0,
                          "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0}}, ALL_TARGETS),
    "seed_oss": ({"head_dim": 16}, ALL_TARGETS),
    "ernie4_5": ({"head_dim": 16, "use_bias": True}, ALL_TARGETS),
    "apertus": ({"head_dim": 16}, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                   "mlp.up_proj", "mlp.down_proj"]),
    "internlm3": ({"head_dim": 16, "qkv_bias": True, "bias": True}, ALL_TARGETS),
    "qwen2_moe": ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 64, "mlp_only_layers": [3]},
                  ["self_attn.q_proj", "self_attn.v_proj", "experts.*.gate_proj", "experts.*.up_proj",
                   "experts.*.down_proj", "shared_expert.gate_proj", "shared_expert.down_proj", "shared_expert_gate",
                   "mlp.up_proj"]),
    "qwen3_moe": ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 32,
                   "norm_topk_prob": True},
                  ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate", "experts.*.gate_proj", "experts.*.up_proj",
                   "experts.*.down_proj"]),
    "olmoe": ({"num_experts": 4, "num_experts_per_tok": 2, "clip_qkv": 2.0},
              ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate", "experts.*.gate_proj", "experts.*.up_proj",
               "experts.*.down_proj"]),
    "phimoe": ({"num_local_experts": 4, "attention_bias": True, "lm_head_bias": True, "rope_scaling": {
        "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0, 2.5], "long_factor": [2.0] * 8,
        "short_mscale": 1.1, "long_mscale": 1.3, "original_max_position_embeddings": 16}},
               ["q_proj", "o_proj", "experts.*.w1", "experts.*.w3", "w2"]),
    "glm4_moe": ({"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                  "moe_intermediate_size": 32, "use_qk_norm": True, "attention_bias": True, "head_dim": 32},
                 ["q_proj", "k_proj", "v_proj", "o_proj", "experts.*.gate_proj", "experts.*.up_proj",
                  "experts.*.down_proj", "shared_experts.gate_proj", "shared_experts.up_proj",
                  "shared_experts.down_proj"]),
    "ernie4_5_moe": ({"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32, "moe_num_shared_experts": 1,
                      "use_bias": True},
                     ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate", "experts.*.gate_proj", "experts.*.up_proj",
                      "experts.*.down_proj", "shared_experts.gate_proj", "shared_experts.up_proj",
                      "shared_experts.down_proj"]),
    "hunyuan_v1_moe": ({"num_experts": 4, "moe_topk": 2, "head_dim": 16, "rope_theta": 10000.0,
                        "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0}},
                       ["q_proj", "k_proj", "v_proj", "o_proj", "gate.wg", "experts.*.gate_proj",
                        "experts.*.up_proj", "experts.*.down_proj", "shared_mlp.gate_proj", "shared_mlp.up_proj",
                        "shared_mlp.down_proj"]),
    # V2: the queries without a bottleneck, the router a linear layer, layer 2 dense (the last two are adapted)
    "deepseek_v2": ({**DEEPSEEK, "q_lora_rank": None, "first_k_dense_replace": 3,
                     "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
                    ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "mlp.gate", "experts.*.gate_proj",
                     "experts.*.up_proj", "experts.*.down_proj", "shared_experts.gate_proj", "shared_experts.up_proj",
                     "shared_experts.down_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    "deepseek_v3": ({**DEEPSEEK, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1},
                    ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "experts.*.gate_proj",
                     "experts.*.up_proj", "experts.*.down_proj", "shared_experts.gate_proj", "shared_experts.up_proj",
                     "shared_experts.down_proj"]),
    "mistral3": ({"head_dim": 32}, ALL_TARGETS),
    "gemma3": ({"head_dim": 32, "sliding_window": 16, "sliding_window_pattern": 2}, ALL_TARGETS),
    # the last layer (full attention) attends to layer 1's K/V and has no k_proj and v_proj; layer 1 none of v_proj
    # (attention_k_eq_v); per-layer embeddings; experts beside the MLP (stacked: their router alone is a target)
    "gemma4_text": (GEMMA4, GEMMA4_TARGETS),
    "gemma4": ({**GEMMA4, "audio_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                           "output_proj_dims": 32, "subsampling_conv_channels": [8, 4]}},
               GEMMA4_TARGETS),
    "falcon": ({"new_decoder_architecture": True, "num_kv_heads": 2, "ffn_hidden_size": 128},
               ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "falcon_h1": ({"head_dim": 32, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_state": 16, "mamba_n_groups": 2,
                   "mamba_chunk_size": 16, "mamba_rms_norm": True, "mamba_norm_before_gate": False,
                   "embedding_multiplier": 2.0, "key_multiplier": 0.7, "attention_in_multiplier": 1.3,
                   "attention_out_multiplier": 0.8, "ssm_in_multiplier": 1.25, "ssm_out_multiplier": 0.6,
                   "mlp_multipliers": [0.9, 0.6], "ssm_multipliers": [0.35, 0.25, 0.35, 0.5, 0.7]},
                  ATTENTION + ["mamba.in_proj", "mamba.out_proj", "feed_forward.gate_proj", "feed_forward.up_proj",
                               "feed_forward.down_proj"]),
    # the stacked experts and the routers are no linear layers: attention is what these two can adapt
    # (logits_scaling, which test_models covers, slows the loss's fall too much for attention's adapters alone)
    "granitemoe": ({"num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 2.0,
                    "residual_multiplier": 0.5, "attention_multiplier": 0.1, "tie_word_embeddings": True},
                   ATTENTION),
    # Mamba-2 and attention layers, both among the last two; Granite's multipliers but logits_scaling (as above)
    "granitemoehybrid": ({"layer_types": ["mamba", "mamba", "attention", "mamba"], "position_embedding_type": "rope",
                          "mamba_n_heads": 8, "mamba_d_state": 16, "mamba_n_groups": 2, "mamba_chunk_size": 16,
                          "num_local_experts": 4, "shared_intermediate_size": 64, "embedding_multiplier": 2.0,
                          "residual_multiplier": 0.5, "attention_multiplier": 0.1},
                         ATTENTION + ["mamba.in_proj", "mamba.out_proj", "shared_mlp.input_linear",
                                      "shared_mlp.output_linear"]),
    "gpt_oss": ({"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16,
                 "swiglu_limit": 0.6}, ATTENTION),
    "llama4_text": (LLAMA4, ATTENTION + ["shared_expert.gate_proj", "shared_expert.up_proj",
                                        "shared_expert.down_proj", "feed_forward.gate_proj",
                                        "feed_forward.up_proj", "feed_forward.down_proj"]),
    # short convolutions (with biases) and attention: each kind of linear layer of both
    "lfm2": ({"layer_types": LFM2_LAYERS, "conv_bias": True}, LFM2_TARGETS + ["w1", "w2", "w3"]),
    "lfm2_moe": ({"layer_types": LFM2_LAYERS, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "num_dense_layers": 1},
                 LFM2_TARGETS + ["experts.*.w1", "experts.*.w3", "experts.*.w2"]),
    "lfm2_vl": ({"layer_types": LFM2_LAYERS[::-1]}, LFM2_TARGETS + ["w1", "w2", "w3"]),
    "qwen3_next": ({**GATED_DELTA, **QWEN_MOE},
                   ATTENTION + ["in_proj_qkvz", "in_proj_ba", "out_proj"] + QWEN_MOE_TARGETS),
    # the language model of the vision-language model (Qwen3.5's hub checkpoints); attention first and last
    "qwen3_5": ({**GATED_DELTA, "layer_types": ["full_attention"] + ["linear_attention"] * 2 + ["full_attention"]},
                ALL_TARGETS + ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]),
    # every expert for every token (quantized, the router would choose others for some tokens: a jump), and wider
    # value heads: the random linear attention, its output normed per head, doubles quantization's errors
    "qwen3_5_moe_text": ({**GATED_DELTA, **QWEN_MOE, "num_experts_per_tok": 4, "linear_value_head_dim": 32},
                         ATTENTION + ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
                         + QWEN_MOE_TARGETS),
}
# Families whose adapters, as their row above sets them, PEFT (0.21) does not load as trained, and why.
# transformers 5 holds each layer's experts stacked in one tensor, which PEFT adapts through target_parameters
# alone; it converts per-expert adapters (experts.N.gate_proj, ...) into that form for the model types it
# knows (Mixtral and those converted as Qwen2-MoE is, but not qwen2_moe itself, nor phimoe), and only if every
# expert's gate, up and down projections (or down alone) are adapted, moving every target named gate_proj,
# up_proj or down_proj there: MLPs of those names outside the experts lose their adapters.
PEFT_LOADS_OTHERWISE = {
    "mixtral": "one expert's w3 alone is adapted",
    "qwen2_moe": "no conversion for its experts: their adapters are not loaded",
    "phimoe": "no conversion for its experts: their adapters are not loaded",
    "glm4_moe": "the shared experts' adapters are not loaded",
    "ernie4_5_moe": "the shared experts' adapters are not loaded",
    "hunyuan_v1_moe": "the shared MLP's adapters are not loaded",
    "deepseek_v2": "the shared experts' adapters are not loaded, nor the dense layers' MLP's",
    "deepseek_v3": "the shared experts' adapters are not loaded",
    "lfm2_moe": "no conversion for its experts: their adapters are not loaded (attention's and conv's are)",
    "qwen3_next": "the shared expert's adapters are not loaded",
    "qwen3_5_moe_text": "no conversion for its experts, and its router no linear layer: PEFT refuses their adapters",
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


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.startswith("gemma4")], indirect=True)
def test_transformers_4_layout_reads_as_transformers_reads_it(family, tmp_path):
    # (Gemma 4 came after transformers 4: its configs have one layout, test_gemma4_hub_layout_...)
    """The same checkpoint with transformers 4's config layout: transformers 5 and we read it alike."""
    folder, _, _, tokens = family
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    if "text_config" in config:
        config["text_config"] = v4_layout(config["text_config"])
    else:
        config = v4_layout(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = transformers_class(tmp_path).from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert np.abs(logits(utils.load(str(tmp_path))[0], tokens) - torch_logits(reference, tokens)).max() <= FP32_ATOL


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_lora_lowers_the_loss(family, data_dir, tmp_path, capsys):
    folder, _, targets, _ = family
    adapters = tmp_path / "adapters.safetensors"
    # 5e-3: at 1e-2 the validation loss of one family's random model (Qwen2, tied embeddings) stalls
    out = run_lora(capsys, "--model", folder, "--data", data_dir, "--train", "--iters", 10, "--batch-size", 4,
                   "--learning-rate", 5e-3, "--lora-layers", 2, "--lora-rank", 4, "--lora-alpha", 8,
                   "--eval-on-start", "--steps-per-eval", 10, "--val-batches", -1, "--adapter-file", adapters,
                   "--lora-targets", *targets)
    losses = val_losses(out)
    assert losses[10] < losses[1] - 0.3, out
    saved = {k.split(".", 3)[3].rsplit(".", 1)[0] for k in mx.load(str(adapters))}
    for target in targets:  # each target adapted something
        assert any(models.target_matches(path, target) for path in saved), (target, saved)


@pytest.mark.parametrize("kind", ["dora", "full"])
@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_dora_and_full_fine_tuning_lower_the_loss(family, kind, data_dir, tmp_path, capsys):
    """DoRA on the row's targets, full fine-tuning of the last two layers (their every weight, the stacked
    experts' too)."""
    folder, _, targets, _ = family
    out = run_lora(capsys, "--model", folder, "--data", data_dir, "--train", "--iters", 10, "--batch-size", 4,
                   "--learning-rate", 2e-2 if kind == "dora" else 1e-3, "--lora-layers", 2, "--fine-tune-type", kind,
                   "--eval-on-start", "--steps-per-eval", 10, "--val-batches", -1, "--adapter-file",
                   tmp_path / "adapters.safetensors",
                   *(["--lora-targets", *targets] if kind == "dora" else []))
    losses = val_losses(out)
    # 0.05: Granite's logits, divided by logits_scaling, move the least (0.07 in 10 DoRA steps)
    assert losses[10] < losses[1] - 0.05, out


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_fused_model_loads_in_transformers(family, tmp_path):
    folder, reference, targets, tokens = family
    assert np.abs(logits(utils.load(str(folder))[0], tokens) - torch_logits(reference, tokens)).max() <= FP32_ATOL
    adapted = random_adapter(folder, tmp_path / "adapters.safetensors", targets)
    expected = logits(adapted, tokens)
    assert np.abs(expected - torch_logits(reference, tokens)).max() > 0.1  # the adapters matter
    # layers whose adapters PEFT refuses (Family.peft_refused): no export (test_export_peft_refuses_what_peft_does)
    refused = models.FAMILIES[reference.config.model_type].peft_refused
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--save-path", tmp_path / "fused",
             *([] if refused else ["--export-peft", tmp_path / "peft"]))
    fused = transformers_class(tmp_path / "fused").from_pretrained(tmp_path / "fused", dtype=torch.float32)
    assert np.abs(torch_logits(fused, tokens) - expected).max() <= FP32_ATOL
    if reference.config.model_type not in PEFT_LOADS_OTHERWISE and not refused:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(copy_of(reference), tmp_path / "peft").eval()
        assert np.abs(torch_logits(peft_model, tokens) - expected).max() <= FP32_ATOL


@pytest.mark.parametrize("family", ["glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "deepseek_v2", "deepseek_v3",
                                    "qwen3_next"], indirect=True)
def test_peft_loads_the_experts_adapters(family, tmp_path):
    """The families whose shared experts' adapters (and dense layers' MLP's) PEFT does not load
    (PEFT_LOADS_OTHERWISE): it loads the others (attention's, the router's, the experts') as they were trained."""
    from peft import PeftModel

    folder, reference, targets, tokens = family
    loaded = [t for t in targets if "shared" not in t and t not in ALL_TARGETS[4:]]  # (mlp.gate_proj, ...)
    adapted = random_adapter(folder, tmp_path / "adapters.safetensors", loaded)
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--export-peft", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy_of(reference), tmp_path / "peft").eval()
    assert np.abs(torch_logits(peft_model, tokens) - logits(adapted, tokens)).max() <= FP32_ATOL


@pytest.mark.parametrize("kind", ["lora", "dora", "quantized"])
@pytest.mark.parametrize("family", ["deepseek_v3"], indirect=True)
def test_latent_attention_generates_through_the_layer_as_it_is(family, kind):
    """A token generated alone attends in the latent's space through kv_b_proj's weight as the layer holds it (an
    adapter's merged into it, a quantized one's dequantized): the prompt and then one token at a time give the
    whole sequence's logits."""
    folder, _, _, tokens = family
    model = utils.load(str(folder))[0]
    if kind == "quantized":
        models.quantize(model, lambda path, m: {"group_size": 32, "bits": 4} if path.endswith("kv_b_proj") else None)
    else:
        models.linear_to_lora_layers(model, ["kv_b_proj"], -1, rank=4, kind=kind)
        mx.random.seed(0)
        for layer in models.lora_layers(model).values():
            layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
            if kind == "dora":
                layer.m = layer.m * (1 + 0.2 * mx.random.normal(layer.m.shape))
    cache = model.make_cache()
    steps = [model(mx.array([tokens[:5]]), cache)] + [model(mx.array([[t]]), cache) for t in tokens[5:]]
    assert np.abs(np.array(mx.concatenate(steps, axis=1)) - logits(model, tokens)).max() <= FP32_ATOL
@pytest.mark.parametrize("family", ["falcon_h1"], indirect=True)
def test_export_peft_refuses_what_peft_does(family, tmp_path):
    """PEFT refuses LoRA on Falcon-H1's Mamba mixers' out_proj (as on the other Mamba model types it lists):
    --export-peft of adapters there is one error, and writes nothing; without them, PEFT loads the others as they
    were trained."""
    from peft import LoraConfig, PeftModel

    folder, reference, targets, tokens = family
    random_adapter(folder, tmp_path / "adapters.safetensors", targets)
    with pytest.raises(utils.UserError, match=r"^--export-peft: .* adapts model\.layers\.\d\.mamba\.out_proj, whose "):
        run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--export-peft",
                 tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ValueError, match="out_proj"):  # as PEFT would have it
        PeftModel(copy_of(reference), LoraConfig(target_modules=["mamba.out_proj"]))
    accepted = [t for t in targets if t != "mamba.out_proj"]
    adapted = random_adapter(folder, tmp_path / "accepted.safetensors", accepted)
    run_fuse("--model", folder, "--adapter-file", tmp_path / "accepted.safetensors", "--export-peft", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy_of(reference), tmp_path / "peft").eval()
    assert np.abs(torch_logits(peft_model, tokens) - logits(adapted, tokens)).max() <= FP32_ATOL


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_quantized_conversion_and_fuse(family, tmp_path):
    """convert -q quantizes every linear layer (experts too), except the routers (Family.unquantized); fuse.py
    re-quantizes."""
    folder, reference, targets, tokens = family
    convert.convert(convert.build_parser().parse_args(
        ["--hf-path", str(folder), "--mlx-path", str(tmp_path / "q8"), "-q", "--q-bits", "8", "--q-group-size", "32"]))
    quantized, _, _ = utils.load(str(tmp_path / "q8"))
    kinds = {path: type(m) for path, m in quantized.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    kept = quantized.args.family.unquantized
    assert all(issubclass(kind, (nn.QuantizedLinear, nn.QuantizedEmbedding)) == (not path.endswith(kept))
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


@pytest.mark.parametrize("family", ["mixtral"], indirect=True)
def test_experts_adapters_resume_exactly_and_fuse(family, data_dir, tmp_path, capsys):
    """DoRA on every expert's w1 and on one expert's w3 (the others' stay the base's): the adapter file holds each
    adapted expert's adapters apart, in LoRALinear's layout; a run resumed from a checkpoint ends where the whole
    run does; the fused model gives the adapted one's logits."""
    folder, _, _, tokens = family

    def train(out, *flags):
        run_lora(capsys, "--model", folder, "--data", data_dir, "--train", "--iters", 4, "--batch-size", 4,
                 "--learning-rate", 1e-2, "--lora-layers", 2, "--lora-rank", 4, "--fine-tune-type", "dora",
                 "--val-batches", 0, "--adapter-file", out / "adapters.safetensors",
                 "--lora-targets", "experts.*.w1", "block_sparse_moe.experts.3.w3", *flags)
        return mx.load(str(out / "adapters.safetensors"))

    whole = train(tmp_path / "whole", "--save-every", 2)
    assert sorted(whole) == sorted(f"model.layers.{i}.block_sparse_moe.experts.{e}.{layer}.{name}" for i in (2, 3)
                                   for e, layer in [(0, "w1"), (1, "w1"), (2, "w1"), (3, "w1"), (3, "w3")]
                                   for name in ("lora_a", "lora_b", "m"))
    assert [whole[f"model.layers.3.block_sparse_moe.experts.3.w3.{name}"].shape for name in ("lora_a", "lora_b", "m")
            ] == [(64, 4), (4, 128), (128,)]
    resumed = train(tmp_path / "resumed", "--resume", tmp_path / "whole" / "runs" / "1" / "step-0000002")
    assert all(np.allclose(whole[k], resumed[k], atol=1e-6) for k in whole)
    adapted = utils.load(str(folder))[0]
    base = logits(adapted, tokens)
    utils.load_adapters(adapted, tmp_path / "whole" / "adapters.safetensors")
    assert np.abs(logits(adapted, tokens) - base).max() > 0.1
    run_fuse("--model", folder, "--adapter-file", tmp_path / "whole" / "adapters.safetensors",
             "--save-path", tmp_path / "fused")
    assert np.abs(logits(utils.load(str(tmp_path / "fused"))[0], tokens) - logits(adapted, tokens)).max() <= FP32_ATOL


@pytest.mark.parametrize("family", ["mixtral"], indirect=True)
def test_full_weights_of_some_experts(family):
    """Full weights (as files hold them: each expert's apart) that lack an expert's leave it the model's own, as
    they do any other weight."""
    folder, _, _, _ = family
    model = utils.load(str(folder))[0]
    name = "model.layers.3.block_sparse_moe.experts.{}.w1.weight"
    utils.load_full_weights(model, {name.format(e): mx.zeros((128, 64)) for e in (0, 1, 3)}, "full.safetensors")
    stack = model.layers[3].block_sparse_moe.experts.w1.weight
    assert np.array_equal(stack[2], mx.load(str(folder / "model.safetensors"))[name.format(2)])
    assert not stack[mx.array([0, 1, 3])].any()


@pytest.mark.parametrize("family", ["qwen3_moe"], indirect=True)
def test_quantized_experts_in_mlx_lm_layout(family, tmp_path):
    """convert -q writes the experts stacked and quantized as mlx-lm does (switch_mlp, as mlx-community's 4-bit
    Qwen3-30B-A3B holds them): mlx_lm.load reads our folder, and we read one mlx-lm wrote, with the same logits."""
    import mlx_lm

    folder, _, _, tokens = family
    hub = tmp_path / "hub"  # the hub's config (transformers 4's names), which mlx-lm reads
    shutil.copytree(folder, hub)
    config = v4_layout(json.loads((folder / "config.json").read_text()))
    config["num_experts"] = config.pop("num_local_experts")
    (hub / "config.json").write_text(json.dumps(config))
    convert.convert(convert.build_parser().parse_args(
        ["--hf-path", str(hub), "--mlx-path", str(tmp_path / "q4"), "-q", "--q-group-size", "32"]))
    written = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    assert not [k for k in written if ".experts." in k]
    assert written["model.layers.3.mlp.switch_mlp.down_proj.scales"].shape == (4, 64, 1)
    ours = utils.load(str(tmp_path / "q4"))[0]
    assert isinstance(ours.layers[3].mlp.experts.down_proj, models.QuantizedExpertsLinear)
    assert np.abs(logits(ours, tokens) - logits(mlx_lm.load(str(tmp_path / "q4"))[0], tokens)).max() <= 1e-4
    mlx_lm.convert(str(hub), str(tmp_path / "mlx_lm"), quantize=True, q_group_size=32)
    theirs = mlx_lm.load(str(tmp_path / "mlx_lm"))[0]
    assert np.abs(logits(utils.load(str(tmp_path / "mlx_lm"))[0], tokens) - logits(theirs, tokens)).max() <= 1e-4


@pytest.mark.parametrize("family", ["lfm2"], indirect=True)
def test_lfm2_in_mlx_lm_layout(family, tmp_path):
    """mlx-lm holds the short convolutions' weights as [channels, taps, 1] (transformers [channels, 1, taps]): its
    quantized folders (mlx-community's 4-bit LFM2) load here, and mlx_lm.load reads ours, with the same logits."""
    import mlx_lm

    folder, _, _, tokens = family
    hub = tmp_path / "hub"  # with the hub's block_dim, which mlx-lm needs
    shutil.copytree(folder, hub)
    config = json.loads((folder / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps({**config, "block_dim": config["hidden_size"]}))
    convert.convert(convert.build_parser().parse_args(
        ["--hf-path", str(hub), "--mlx-path", str(tmp_path / "q4"), "-q", "--q-group-size", "32"]))
    ours = utils.load(str(tmp_path / "q4"))[0]
    assert np.abs(logits(ours, tokens) - logits(mlx_lm.load(str(tmp_path / "q4"))[0], tokens)).max() <= 1e-4
    mlx_lm.convert(str(hub), str(tmp_path / "mlx_lm"), quantize=True, q_group_size=32)
    assert mx.load(str(tmp_path / "mlx_lm" / "model.safetensors"))["model.layers.0.conv.conv.weight"].shape == (64, 3, 1)
    theirs = mlx_lm.load(str(tmp_path / "mlx_lm"))[0]
    assert np.abs(logits(utils.load(str(tmp_path / "mlx_lm"))[0], tokens) - logits(theirs, tokens)).max() <= 1e-4


@pytest.mark.parametrize("family", ["glm4_moe", "ernie4_5_moe"], indirect=True)
def test_multi_token_prediction_weights_are_dropped(family, tmp_path):
    """The weights of the multi-token prediction layers that GLM-4.5 (after the decoder layers) and ERNIE 4.5
    (mtp_*) checkpoints hold, which transformers drops on loading, and so do load and convert."""
    import shutil

    folder, reference, _, tokens = family
    shutil.copytree(folder, tmp_path / "mtp")
    extra = "model.layers.4.mlp.experts.0.up_proj.weight" if "glm4" in str(folder) else "model.mtp_linear_proj.weight"
    mx.save_safetensors(str(tmp_path / "mtp" / "mtp.safetensors"), {extra: mx.zeros((32, 64))})
    model = utils.load(str(tmp_path / "mtp"))[0]
    assert np.abs(logits(model, tokens) - torch_logits(reference, tokens)).max() <= FP32_ATOL
    convert.convert(convert.build_parser().parse_args(["--hf-path", str(tmp_path / "mtp"), "--mlx-path",
                                                       str(tmp_path / "converted")]))
    assert extra not in mx.load(str(tmp_path / "converted" / "model.safetensors"))


def test_phi3_vision_trains_text_only_and_keeps_the_image_encoder(phi3_vision, data_dir, tmp_path, capsys):
    folder, reference, vision = phi3_vision
    model, tokenizer, _ = utils.load(str(folder))
    tokens = tokenizer.encode(PROMPT)
    assert np.abs(logits(model, tokens) - torch_logits(reference, tokens)).max() <= FP32_ATOL

    # the tutorial's recipe: LoRA on self_attn.qkv_proj (the default for Phi-3)
    adapters = tmp_path / "adapters.safetensors"
    out = run_lora(capsys, "--model", folder, "--data", data_dir, "--train", "--iters", 30, "--lora-layers", 2,
                   "--lora-rank", 16, "--lora-alpha", 32, "--learning-rate", 1e-2, "--eval-on-start",
                   "--steps-per-eval", 30, "--val-batches", -1,
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


def fused_and_quantized_keep(folder, adapters, source, kept, tmp_path, language_model: str) -> dict:
    """fuse.py writes the checkpoint's names back, the `kept` weights untouched, and PEFT adapters of the
    language model alone; convert -q quantizes the language model (under `language_model`) and leaves the
    kept weights as they are. The quantized folder's quantization entry."""
    run_fuse("--model", folder, "--adapter-file", adapters, "--save-path", tmp_path / "fused",
             "--export-peft", tmp_path / "peft")
    written = mx.load(str(tmp_path / "fused" / "model.safetensors"))
    assert sorted(written) == sorted(source)
    assert all(np.array_equal(written[k], v) for k, v in kept.items())
    peft = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in peft)

    convert.convert(convert.build_parser().parse_args(
        ["--hf-path", str(folder), "--mlx-path", str(tmp_path / "q4"), "-q", "--q-group-size", "32"]))
    written = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    assert all(np.array_equal(written[k], v) for k, v in kept.items())
    assert f"{language_model}layers.0.self_attn.q_proj.scales" in written
    return json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]


@pytest.mark.parametrize("family", ["mistral3", "gemma3"], indirect=True)
def test_vision_language_models_train_text_only_and_keep_the_image_encoder(family, tmp_path):
    """The checkpoint's names come back as they were: the language model's under language_model.model, the
    image encoder's and projector's untouched; PEFT adapts the language model alone. A checkpoint in
    transformers' in-memory layout (model.language_model, model.vision_tower) loads too, and fuses into one
    that transformers reads."""
    folder, reference, _, tokens = family
    source = mx.load(str(folder / "model.safetensors"))
    kept = {k: v for k, v in source.items() if not k.startswith("language_model.")}
    assert kept and all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in kept)
    random_adapter(folder, tmp_path / "adapters.safetensors", ALL_TARGETS)
    quantization = fused_and_quantized_keep(folder, tmp_path / "adapters.safetensors", source, kept, tmp_path,
                                            "language_model.model.")
    assert json.loads((tmp_path / "fused" / "config.json").read_text()) == json.loads(
        (folder / "config.json").read_text())
    assert "language_model.model.embed_tokens" in quantization

    in_memory = tmp_path / "in_memory"
    shutil.copytree(folder, in_memory)
    mx.save_safetensors(str(in_memory / "model.safetensors"), {
        k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
        if k.startswith("language_model.") else "model." + k: v for k, v in source.items()}, {"format": "pt"})
    model, _, _ = utils.load(str(in_memory))
    expected = torch_logits(reference, tokens)
    assert np.abs(logits(model, tokens) - expected).max() <= FP32_ATOL
    run_fuse("--model", in_memory, "--adapter-file", tmp_path / "peft", "--save-path", tmp_path / "fused2")
    fused = transformers_class(tmp_path / "fused2").from_pretrained(tmp_path / "fused2", dtype=torch.float32)
    adapted, _, _ = utils.load(str(folder))
    utils.load_adapters(adapted, tmp_path / "peft")
    assert np.abs(torch_logits(fused, tokens) - logits(adapted, tokens)).max() <= FP32_ATOL


@pytest.mark.parametrize("family", ["lfm2_vl"], indirect=True)
def test_lfm2_vl_trains_text_only_and_keeps_the_image_encoder(family, tmp_path):
    """Lfm2VlForConditionalGeneration holds and saves its language model at model.language_model: the checkpoint's
    names come back as they were, the image encoder and projector untouched; PEFT adapts the language model alone."""
    folder, _, targets, _ = family
    source = mx.load(str(folder / "model.safetensors"))
    kept = {k: v for k, v in source.items() if not k.startswith("model.language_model.")}
    assert {k.split(".")[1] for k in kept} == {"vision_tower", "multi_modal_projector"}
    random_adapter(folder, tmp_path / "adapters.safetensors", targets)
    fused_and_quantized_keep(folder, tmp_path / "adapters.safetensors", source, kept, tmp_path, "model.language_model.")


def test_mistral3_ties_the_output_layer_as_transformers_5_does(make_checkpoint, tmp_path):
    """Mistral Small 3.1's config says nothing of tying at its top level (where transformers' default is to tie):
    its checkpoint's own output layer is used, not the embedding."""
    folder, reference = make_checkpoint("mistral3", tie_word_embeddings=False)
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    del config["tie_word_embeddings"], config["text_config"]["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokens = utils.load(str(tmp_path))[1].encode(PROMPT)
    model = utils.load(str(tmp_path))[0]
    assert not model.args.tie_word_embeddings
    assert np.abs(logits(model, tokens) - torch_logits(reference, tokens)).max() <= FP32_ATOL


def test_gemma3_reads_the_text_config_defaults_as_transformers_does():
    """Gemma 3's hub configs leave most of text_config out (gemma-3-4b-it's, abridged)."""
    import transformers

    config = {"model_type": "gemma3", "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}}
    args = models.ModelArgs.from_config(config)
    text = transformers.AutoConfig.for_model(**config).text_config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "rms_norm_eps",
                "layer_types"):
        assert getattr(args, key) == getattr(text, key), key
    for kind, rope in text.rope_parameters.items():
        assert args.rope_parameters[kind] == {"partial_rotary_factor": 1.0, **rope}, kind
    assert args.attention_scale == text.query_pre_attn_scalar ** -0.5 and args.tie_word_embeddings


def test_list_targets(make_checkpoint, capsys):
    folder, _ = make_checkpoint("mixtral", **FAMILIES["mixtral"][0])
    out = run_lora(capsys, "--list-targets", folder)
    lines = [line.split() for line in out.splitlines()[1:]]
    assert [line[0] for line in lines[:6]] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "block_sparse_moe.gate",
                                              "block_sparse_moe.experts.0.w1"]
    assert lines[0][1:] == ["64", "->", "64", "(default)"] and lines[4][1:] == ["64", "->", "4"]
    assert len(lines) == 4 + 1 + 4 * 3


def test_apertus_activation_loads_saves_and_trains_as_transformers_holds_it(make_checkpoint, tmp_path):
    """xIELU's alpha_p and alpha_n are frozen under adapters and trained with a fully fine-tuned layer; beta
    and eps, buffers in transformers, never are. mlx-lm's checkpoints hold the alphas as () rather than (1,):
    they load alike, and are written back in transformers' shapes."""
    import shutil

    from mlx.utils import tree_flatten

    folder, reference = make_checkpoint("apertus", **FAMILIES["apertus"][0])
    model, tokenizer, _ = utils.load(str(folder))
    model.freeze()
    model.layers[-1].unfreeze()
    model.layers[-1].mlp.act_fn.unfreeze(recurse=False, keys=["beta"])
    trained = {k for k, _ in tree_flatten(model.trainable_parameters()) if ".act_fn." in k}
    assert trained == {"model.layers.3.mlp.act_fn.alpha_p", "model.layers.3.mlp.act_fn.alpha_n"}

    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    weights = mx.load(str(tmp_path / "model.safetensors"))
    mx.save_safetensors(str(tmp_path / "model.safetensors"),
                        {k: v.squeeze() if k.endswith(("alpha_p", "alpha_n")) else v for k, v in weights.items()})
    tokens = tokenizer.encode(PROMPT)
    mlx_lm_layout, _, _ = utils.load(str(tmp_path))
    assert np.abs(logits(mlx_lm_layout, tokens) - torch_logits(reference, tokens)).max() <= FP32_ATOL
    written = dict(tree_flatten(mlx_lm_layout.parameters()))
    assert {k: written[k].shape for k in written if ".act_fn." in k} == {k: v.shape for k, v in weights.items()
                                                                        if ".act_fn." in k}
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


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_speed_machinery_keeps_each_tokens_loss(family, data_dir):
    """What training adds for speed changes no token's loss, in every family: packed rows (one mask over the
    row, and the examples laid out as rows of their own), the frozen layers computed once (where the hidden
    states are all that layers read, Family.layer_at_a_time: else never), gradient checkpointing; and only the
    families whose attention depends on the positions themselves, or whose layers carry a state along the row,
    cannot pack with one mask over the row (ModelArgs.packs_by_example)."""
    import lora

    folder, _, targets, _ = family
    model, tokenizer, _ = utils.load(str(folder))
    model.freeze()
    models.linear_to_lora_layers(model, targets, 2, rank=4)
    mx.random.seed(0)
    for layer in models.lora_layers(model).values():
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    dataset = lora.tokenize(lora.load_dataset(data_dir, "train"), tokenizer, 1, 2048, "train")[:8]

    def token_losses(batches):
        return np.concatenate([np.array(lora.token_losses(model, *batch[:3], packing=batch[3] if len(batch) > 3
                                                          else None))[np.array(batch[2]).reshape(-1)]
                               for batch in batches])

    plain = token_losses(lora.make_batch(dataset[i:i + 4], False) for i in (0, 4))
    # such a family packs one example a row (lora.train)
    for by_example in (True,) if model.args.packs_by_example else (True, False):
        packed = token_losses(lora.make_batch(dataset[i:i + 4], True, by_example) for i in (0, 4))
        assert np.abs(packed - plain).max() < 1e-4, by_example
    if model.args.packs_by_example:  # the mask over the row does change their losses
        packed = token_losses(lora.make_batch(dataset[i:i + 4], True, False) for i in (0, 4))
        assert np.abs(packed - plain).max() > 1e-3
    model.grad_checkpoint = True
    assert np.abs(token_losses(lora.make_batch(dataset[i:i + 4], False) for i in (0, 4)) - plain).max() < 1e-4
    model.grad_checkpoint = False
    if not model.args.family.layer_at_a_time:
        args = lora.training_args(lora.build_parser().parse_args([]))
        with lora.frozen_layers_cached(model, [dataset], args, 1000, str(folder)) as (kept,):
            assert model.frozen_prefix is None and kept is dataset
        return
    prefix, (rows,) = lora.frozen_prefix(model, [dataset])
    assert prefix is not None and prefix.layer == len(model.layers) - 2
    model.frozen_prefix = prefix
    cached = token_losses(lora.make_batch(rows[i:i + 4], False) for i in (0, 4))
    model.frozen_prefix = None
    assert np.abs(cached - plain).max() < 1e-4


@pytest.mark.parametrize("family", ["gemma4_text"], indirect=True)
def test_gemma4_layers_read_more_than_the_hidden_states(family, data_dir):
    """Gemma 4's layers read per-layer embeddings and shared K/V besides the hidden states: the DPO reference pass
    runs the whole model a batch at a time; packed rows and recomputed activations give the gradients of plain
    rows, the K/V-storing layer's adapters' too; layer_scalar, a buffer in transformers, is never trained."""
    import lora

    folder, _, targets, _ = family
    model, tokenizer, _ = utils.load(str(folder))
    model.freeze()
    mx.random.seed(0)
    models.linear_to_lora_layers(model, targets, 3, rank=4)  # layer 1 too, whose K/V layer 3 attends to
    for lora_layer in models.lora_layers(model).values():
        lora_layer.lora_b = 0.1 * mx.random.normal(lora_layer.lora_b.shape)
    rows = lora.tokenize(lora.load_dataset(data_dir, "train"), tokenizer, 1, 2048, "train")[:6]

    pairs = rows[:4]  # two pairs' rows, chosen then rejected
    logps, _ = lora.sequence_logps(model, lora.sequences(pairs[0::2] + pairs[1::2], False))
    assert np.allclose(lora.reference_logps(model, pairs).reshape(-1, 2), np.array(logps).reshape(2, -1).T, atol=1e-4)

    def loss_and_grad(batch):
        return nn.value_and_grad(model, lambda m, *b: lora.loss_fn(m, *b)[0])(model, *batch)

    loss, grad = loss_and_grad(lora.make_batch(rows, pack=False))
    for by_example in (False, True):
        packed_loss, packed_grad = loss_and_grad(lora.make_batch(rows, pack=True, by_example=by_example))
        assert abs(packed_loss.item() - loss.item()) < 1e-4
        for (name, g), (_, p) in zip(tree_flatten(grad), tree_flatten(packed_grad)):
            assert np.abs(np.array(g - p)).max() < 1e-4, name
    model.grad_checkpoint = True
    recomputed_loss, recomputed_grad = loss_and_grad(lora.make_batch(rows, pack=False))
    assert abs(recomputed_loss.item() - loss.item()) < 1e-5
    assert all(np.allclose(g, r, atol=1e-5)
               for (_, g), (_, r) in zip(tree_flatten(grad), tree_flatten(recomputed_grad)))
    model.layers[0].unfreeze()  # as --fine-tune-type full does
    assert "model.layers.0.layer_scalar" not in dict(tree_flatten(model.trainable_parameters()))


@pytest.mark.parametrize("family", ["gemma4_text"], indirect=True)
def test_gemma4_hub_layout_reads_as_transformers_reads_it(family, tmp_path):
    """The hub's Gemma 4 configs give the full layers' sizes as global_head_dim and num_global_key_value_heads
    (the latter only with attention_k_eq_v), not per_layer_config; their checkpoints may hold K/V projections and
    norms for the layers that share others' K/V, which transformers drops, and so do we (load, convert)."""
    folder, reference, _, tokens = family
    shutil.copytree(folder, tmp_path / "hub")
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("per_layer_config") == {"1": {"head_dim": 16, "num_key_value_heads": 1},
                                              "3": {"head_dim": 16, "num_key_value_heads": 1}}
    config.update(global_head_dim=16, num_global_key_value_heads=1)
    (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(folder / "model.safetensors"))
    unused = {f"model.layers.3.self_attn.{name}": weights[f"model.layers.2.self_attn.{name}"]
              for name in ("k_proj.weight", "v_proj.weight", "k_norm.weight")}
    mx.save_safetensors(str(tmp_path / "hub" / "model.safetensors"), {**weights, **unused}, {"format": "pt"})
    ours = models.ModelArgs.from_config(config)
    assert ours == models.ModelArgs.from_config(json.loads((folder / "config.json").read_text()))
    assert ours.layer_head_dims == [8, 16, 8, 16] and ours.layer_kv_heads == [2, 1, 2, 1]
    assert ours.kv_sharing == [None, "store", None, "reuse"] and ours.layer_intermediate_sizes == [128] * 3 + [256]
    hub = transformers_class(tmp_path / "hub").from_pretrained(tmp_path / "hub", dtype=torch.float32).eval()
    expected = torch_logits(reference, tokens)
    assert np.abs(torch_logits(hub, tokens) - expected).max() <= FP32_ATOL
    assert np.abs(logits(utils.load(str(tmp_path / "hub"))[0], tokens) - expected).max() <= FP32_ATOL
    convert.convert(convert.build_parser().parse_args(["--hf-path", str(tmp_path / "hub"), "--mlx-path",
                                                       str(tmp_path / "converted"), "--dtype", "float32"]))
    assert not set(unused) & set(mx.load(str(tmp_path / "converted" / "model.safetensors")))
    # without attention_k_eq_v, num_global_key_value_heads leaves the full layers' K/V heads alone
    del config["attention_k_eq_v"]
    assert models.ModelArgs.from_config(config).layer_kv_heads == [2] * 4


@pytest.mark.parametrize("family", ["granitemoehybrid"], indirect=True)
def test_granite4_hub_layout_reads_as_transformers_reads_it(family, tmp_path):
    """The hub's Granite 4 configs (transformers 4's) name the layer types mamba and attention, leave
    time_step_limit out, and the H models' attention has no rope (position_embedding_type nope); transformers 5
    writes infinity in time_step_limit as {"__float__": "Infinity"}, and mamba_d_head may be "auto"."""
    folder, _, _, tokens = family
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
    assert models.ModelArgs.from_config(config).time_step_limit == [0.0, None]
    hub = {k: v for k, v in config.items() if k != "time_step_limit"}
    hub.update(layer_types=["mamba", "mamba", "attention", "mamba"], position_embedding_type="nope",
               mamba_d_head="auto")
    (tmp_path / "config.json").write_text(json.dumps(hub))
    args = models.ModelArgs.from_config(hub)
    assert args.layer_types == config["layer_types"] and args.rope_layers == [False] * 4 and args.mamba_d_head == 16
    reference = transformers_class(tmp_path).from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert np.abs(logits(utils.load(str(tmp_path))[0], tokens) - torch_logits(reference, tokens)).max() <= FP32_ATOL


@pytest.mark.parametrize("family", ["gemma4"], indirect=True)
def test_gemma4_trains_text_only_and_keeps_the_image_and_audio_encoders(family, data_dir, tmp_path, capsys):
    """Gemma4ForConditionalGeneration holds and saves its language model at model.language_model: the
    checkpoint's names come back as they were, the image and audio encoders untouched; PEFT adapts the language
    model alone; the default targets (q_proj, o_proj) are in every layer."""
    folder, reference, _, tokens = family
    source = mx.load(str(folder / "model.safetensors"))
    kept = {k: v for k, v in source.items() if not k.startswith("model.language_model.")}
    assert {k.split(".")[1] for k in kept} == {"vision_tower", "embed_vision", "audio_tower", "embed_audio"}
    adapters = tmp_path / "adapters.safetensors"
    run_lora(capsys, "--model", folder, "--data", data_dir, "--train", "--iters", 2, "--batch-size", 4,
             "--lora-layers", 2, "--adapter-file", adapters)
    assert sorted(mx.load(str(adapters))) == [f"model.layers.{i}.self_attn.{name}.lora_{ab}"
                                              for i in (2, 3) for name in ("o_proj", "q_proj") for ab in "ab"]
    quantization = fused_and_quantized_keep(folder, adapters, source, kept, tmp_path, "model.language_model.")
    assert quantization["bits"] == 4 and quantization["model.language_model.embed_tokens"]["bits"] == 8


@pytest.mark.parametrize("family", ["qwen3_5"], indirect=True)
def test_qwen3_5_trains_text_only_and_keeps_the_image_encoder(family, tmp_path):
    """Qwen3_5ForConditionalGeneration holds and saves its language model at model.language_model, its image encoder
    at model.visual: the checkpoint's names come back as they were, the image encoder untouched; PEFT adapts the
    language model alone. The hub's checkpoints hold multi-token prediction layers (mtp.*), which transformers
    drops on loading, and so do load and convert."""
    folder, reference, targets, tokens = family
    source = mx.load(str(folder / "model.safetensors"))
    kept = {k: v for k, v in source.items() if not k.startswith("model.language_model.") and k != "lm_head.weight"}
    assert kept and all(k.startswith("model.visual.") for k in kept)
    random_adapter(folder, tmp_path / "adapters.safetensors", targets)
    fused_and_quantized_keep(folder, tmp_path / "adapters.safetensors", source, kept, tmp_path, "model.language_model.")
    shutil.copytree(folder, tmp_path / "mtp")
    mx.save_safetensors(str(tmp_path / "mtp" / "mtp.safetensors"), {"mtp.fc.weight": mx.zeros((64, 128))})
    with_mtp = utils.load(str(tmp_path / "mtp"))[0]
    assert np.abs(logits(with_mtp, tokens) - torch_logits(reference, tokens)).max() <= FP32_ATOL
    convert.convert(convert.build_parser().parse_args(["--hf-path", str(tmp_path / "mtp"), "--mlx-path",
                                                       str(tmp_path / "converted")]))
    assert "mtp.fc.weight" not in mx.load(str(tmp_path / "converted" / "model.safetensors"))


@pytest.mark.parametrize("family", ["qwen3_5_moe_text"], indirect=True)
def test_experts_stacked_as_transformers_5_holds_them(family, tmp_path):
    """Qwen3.5-MoE's hub checkpoints hold each layer's experts stacked as transformers 5 holds them in memory: gate and
    up in one experts.gate_up_proj [experts, 2 x width, hidden], and experts.down_proj. transformers and we read them
    alike, and a layer's weights reload from them (lora.py's frozen-layer cache)."""
    folder, reference, _, tokens = family
    shutil.copytree(folder, tmp_path / "hub")
    weights, stacks = {}, {}
    for name, value in mx.load(str(folder / "model.safetensors")).items():
        expert = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)\.weight", name)
        if expert is None:
            weights[name] = value
        else:
            stacks.setdefault((expert[1], expert[3]), {})[int(expert[2])] = value
    for (experts, layer), pieces in stacks.items():
        stacks[experts, layer] = mx.stack([pieces[e] for e in sorted(pieces)])
    for experts in {experts for experts, _ in stacks}:
        weights[f"{experts}.gate_up_proj"] = mx.concatenate([stacks[experts, "gate_proj"], stacks[experts, "up_proj"]],
                                                            axis=1)
        weights[f"{experts}.down_proj"] = stacks[experts, "down_proj"]
    mx.save_safetensors(str(tmp_path / "hub" / "model.safetensors"), weights, {"format": "pt"})
    expected = torch_logits(reference, tokens)
    hub = transformers_class(tmp_path / "hub").from_pretrained(tmp_path / "hub", dtype=torch.float32).eval()
    assert np.abs(torch_logits(hub, tokens) - expected).max() <= FP32_ATOL
    model = utils.load(str(tmp_path / "hub"))[0]
    assert np.abs(logits(model, tokens) - expected).max() <= FP32_ATOL
    names = [f"model.layers.3.mlp.experts.{layer}.weight" for layer in ("gate_proj", "up_proj", "down_proj")]
    model.update(tree_unflatten([(name, mx.zeros_like(value)) for name, value in tree_flatten(model.parameters())
                                 if name in names]))
    utils.reload_weights(model, str(tmp_path / "hub"), names)
    assert np.abs(logits(model, tokens) - expected).max() <= FP32_ATOL
