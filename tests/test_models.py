"""models.py against transformers' PyTorch implementation on the same random weights (fp32)."""
import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

import models
import utils
from conftest import DEEPSEEK, FP32_ATOL, TINY

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
# Phi-3's longrope: short factors up to the original context, long ones beyond (8 per head of 16 features)
PHI3_ROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0, 2.5],
             "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0]}
# GLM's defaults (head_dim 128, a pad token id beyond the tiny vocabulary) do not fit the tiny models
GLM_TINY = {"head_dim": 16, "pad_token_id": 0}
MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 4,
                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                   "llama_4_scaling_beta": 0.1}
# Gemma 4: two sliding and two full layers (of their own head size), the last two attending to the K/V of the
# first two (num_kv_shared_layers), with per-layer embeddings and the shared layers' double-wide MLP
GEMMA4 = {"head_dim": 16, "global_head_dim": 32, "sliding_window": 24, "vocab_size_per_layer_input": 300,
          "hidden_size_per_layer_input": 8,
          "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}
DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32,
                 "beta_fast": 32.0, "beta_slow": 1.0}
LFM2_LAYERS = ["conv", "full_attention", "conv", "full_attention"]
# Qwen3-Next and Qwen3.5: three linear attention layers, then attention (layer_types' default); small heads
GATED_DELTA = {"head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
               "linear_value_head_dim": 8}
QWEN_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48}
# Granite 4's Mamba-2 layers, tiny: 8 heads of 16 features in 2 groups, a state of 16, chunks of 16 (LENGTH: four)
MAMBA2 = {"mamba_n_heads": 8, "mamba_d_state": 16, "mamba_n_groups": 2, "mamba_chunk_size": 16}
# Falcon-H1: every muP multiplier away from 1, heads wider than hidden_size / heads, the Mamba-2 mixer's scan in
# chunks of 16 (the prompt and LENGTH span several) over two groups of B and C
FALCON_H1 = {"head_dim": 32, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_state": 16, "mamba_n_groups": 2,
             "mamba_chunk_size": 16, "embedding_multiplier": 2.0, "lm_head_multiplier": 0.5, "key_multiplier": 0.7,
             "attention_in_multiplier": 1.3, "attention_out_multiplier": 0.8, "ssm_in_multiplier": 1.25,
             "ssm_out_multiplier": 0.6, "mlp_multipliers": [0.9, 0.6], "ssm_multipliers": [0.35, 0.25, 0.35, 0.5, 0.7]}
CONFIGS = {
    "llama-gqa": ("llama", {}),
    "llama-tied-mha": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_theta": 500.0}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 50000.0}),
    "llama-head-dim-bias": ("llama", {"head_dim": 32, "attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {"rope_theta": 1e6}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 24}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 24}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True, "rope_theta": 1e6}),
    "qwen2-sliding-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 2}),
    "gemma": ("gemma", {"head_dim": 32}),
    "phi-2": ("phi", {"partial_rotary_factor": 0.4, "layer_norm_eps": 1e-5}),
    "phi3": ("phi3", {"sliding_window": 24}),
    "phi3-longrope": ("phi3", {"rope_scaling": PHI3_ROPE, "original_max_position_embeddings": 32}),
    "phi3-longrope-partial": ("phi3", {"rope_scaling": dict(PHI3_ROPE, short_factor=[1.0, 1.2, 1.5, 2.0],
                                                            long_factor=[1.0, 2.0, 4.0, 8.0]),
                                       "partial_rotary_factor": 0.5, "original_max_position_embeddings": 32}),
    "qwen3": ("qwen3", {"head_dim": 32, "use_sliding_window": True, "sliding_window": 24, "max_window_layers": 2}),
    "gemma2": ("gemma2", {"head_dim": 32, "sliding_window": 24, "final_logit_softcapping": 2.0,
                          "attn_logit_softcapping": 5.0}),
    "gemma3_text": ("gemma3_text", {"head_dim": 32, "sliding_window": 24, "sliding_window_pattern": 2,
                                    "rope_parameters": {
                                        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    "smollm3": ("smollm3", {"no_rope_layer_interval": 2}),
    "olmo2": ("olmo2", {}),
    "olmo3": ("olmo3", {"sliding_window": 24}),
    "granite": ("granite", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.1,
                            "logits_scaling": 4.0}),
    "ministral": ("ministral", {"head_dim": 16, "sliding_window": 24,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "cohere": ("cohere", {}),
    "cohere-qk-norm-bias": ("cohere", {"use_qk_norm": True, "attention_bias": True, "logit_scale": 0.5,
                                      "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
    "cohere2": ("cohere2", {"sliding_window": 24, "sliding_window_pattern": 2}),
    "starcoder2": ("starcoder2", {}),
    "starcoder2-sliding-window": ("starcoder2", {"sliding_window": 24, "use_bias": False}),
    "glm": ("glm", GLM_TINY),
    "glm-llama3-rope": ("glm", {**GLM_TINY, "attention_bias": False, "rope_parameters": dict(
        LLAMA3_ROPE, rope_theta=50000.0, partial_rotary_factor=0.75)}),
    "glm4": ("glm4", GLM_TINY),
    # yarn with a gain (mscale_all_dim), and the queries scaled from position 4 on
    "ministral3": ("ministral3", {"head_dim": 16, "rope_parameters": MINISTRAL3_ROPE}),
    "ministral3-sliding-window": ("ministral3", {"head_dim": 16, "sliding_window": 24}),
    # the sliding layers with rope, the others without
    "exaone4": ("exaone4", {"head_dim": 8, "sliding_window": 24, "sliding_window_pattern": 2}),
    "exaone4-global": ("exaone4", {"sliding_window": None, "layer_types": ["full_attention"] * 4,
                                   "rope_parameters": dict(LLAMA3_ROPE, rope_theta=50000.0)}),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", {"head_dim": 16, "tie_word_embeddings": True, "rope_theta": 10000.0,
                                              "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0}}),
    "seed_oss": ("seed_oss", {"head_dim": 16}),
    "seed_oss-out-bias": ("seed_oss", {"head_dim": 16, "attention_bias": False, "attention_out_bias": True,
                                       "mlp_bias": True}),
    "ernie4_5": ("ernie4_5", {"head_dim": 16}),
    "ernie4_5-bias-untied": ("ernie4_5", {"head_dim": 16, "use_bias": True, "tie_word_embeddings": False}),
    "apertus": ("apertus", {"head_dim": 16}),
    # transformers reads it as Llama; dynamic rope, longer than max_position_embeddings
    "internlm3": ("internlm3", {"head_dim": 16, "qkv_bias": True, "bias": True, "max_position_embeddings": 32,
                                "rope_scaling": {"rope_type": "dynamic", "factor": 6.0}}),
    "qwen2_moe": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 48, "mlp_only_layers": [2],
                                "use_sliding_window": True, "sliding_window": 24, "max_window_layers": 3}),
    "qwen2_moe-sparse-step": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 3, "moe_intermediate_size": 32,
                                            "decoder_sparse_step": 2, "norm_topk_prob": True}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "head_dim": 32, "decoder_sparse_step": 2, "norm_topk_prob": True,
                                "use_sliding_window": True, "sliding_window": 24}),
    "olmoe": ("olmoe", {"num_experts": 4, "num_experts_per_tok": 2, "clip_qkv": 1.0}),
    "phimoe": ("phimoe", {"num_local_experts": 4, "attention_bias": True, "lm_head_bias": True, "sliding_window": 24,
                          "router_jitter_noise": 0.3}),
    "phimoe-longrope": ("phimoe", {"num_local_experts": 4, "rope_scaling": dict(
        PHI3_ROPE, short_mscale=1.1, long_mscale=1.3, original_max_position_embeddings=32)}),
    "glm4_moe": ("glm4_moe", {"n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
                              "moe_intermediate_size": 32, "n_shared_experts": 2, "routed_scaling_factor": 2.5,
                              "use_qk_norm": True, "attention_bias": True, "head_dim": 32}),
    "glm4_moe-partial-rope": ("glm4_moe", {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
                                           "moe_intermediate_size": 32, "first_k_dense_replace": 2,
                                           "norm_topk_prob": False, "partial_rotary_factor": 0.25}),
    "ernie4_5_moe": ("ernie4_5_moe", {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32,
                                      "moe_num_shared_experts": 2, "use_bias": True}),
    "ernie4_5_moe-untied": ("ernie4_5_moe", {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32,
                                             "moe_num_shared_experts": 0, "moe_layer_start_index": 0,
                                             "moe_layer_interval": 2, "tie_word_embeddings": False}),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", {"num_experts": 4, "moe_topk": 2, "head_dim": 16, "rope_theta": 10000.0,
                                          "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0}}),
    "hunyuan_v1_moe-default-rope": ("hunyuan_v1_moe", {"num_experts": 4, "moe_topk": 3, "head_dim": 32,
                                                       "attention_bias": True}),
    # latent attention: transformers' default sizes do not fit the tiny model; a key and value per head
    "deepseek_v3": ("deepseek_v3", {**DEEPSEEK, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
                                    "n_shared_experts": 2}),
    # the queries without a bottleneck, rope on halves, biases, yarn with mscale_all_dim (the softmax's scale too)
    "deepseek_v3-yarn-halves": ("deepseek_v3", {
        **DEEPSEEK, "q_lora_rank": None, "n_group": 1, "topk_group": 1, "rope_interleave": False,
        "attention_bias": True, "rope_parameters": {**DEEPSEEK_YARN, "mscale": 1.0, "mscale_all_dim": 0.7}}),
    "deepseek_v2": ("deepseek_v2", {**DEEPSEEK, "q_lora_rank": None, "first_k_dense_replace": 1,
                                    "n_shared_experts": 1}),
    # groups by their best softmax probability; yarn with a gain (mscale over mscale_all_dim)
    "deepseek_v2-groups-yarn": ("deepseek_v2", {
        **DEEPSEEK, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.0,
        "mlp_bias": True, "rope_parameters": {**DEEPSEEK_YARN, "mscale": 0.707, "mscale_all_dim": 0.5}}),
    "sarvam_mla": ("sarvam_mla", {**DEEPSEEK, "n_shared_experts": 2}),
    # the vision-language models' language models: tied where the checkpoint has no output layer of its own
    "mistral3": ("mistral3", {"head_dim": 32, "sliding_window": 24}),
    "mistral3-untied": ("mistral3", {"tie_word_embeddings": False, "rope_theta": 1e6}),
    "mistral3-ministral3": ("mistral3", {"text_model_type": "ministral3", "head_dim": 16,
                                         "rope_parameters": MINISTRAL3_ROPE}),
    "gemma4_text-shared-kv": ("gemma4_text", {**GEMMA4, "num_kv_shared_layers": 2, "use_double_wide_mlp": True,
                                              "final_logit_softcapping": 5.0}),
    # the full layers' values from the keys' projection, with fewer K/V heads; proportional rope scaled; experts
    # beside the MLP; no per-layer embeddings
    "gemma4_text-k-eq-v-experts": ("gemma4_text", {
        **GEMMA4, "hidden_size_per_layer_input": 0, "attention_k_eq_v": True, "num_global_key_value_heads": 1,
        "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                               "rope_theta": 1000.0, "factor": 2.0}}}),
    "gemma4": ("gemma4", {**GEMMA4, "num_kv_shared_layers": 1, "final_logit_softcapping": 5.0}),
    "gemma3": ("gemma3", {"head_dim": 32, "sliding_window": 24, "sliding_window_pattern": 2,
                          "final_logit_softcapping": 5.0}),  # which the vision-language model does not apply
    "falcon-7b": ("falcon", {"ffn_hidden_size": 96}),  # one key-value head, attention and MLP side by side
    "falcon-40b": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "tie_word_embeddings": False}),
    "falcon2-11b": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1,
                               "rope_theta": 5e5}),
    # 16 heads: slopes that bfloat16 rounds
    "falcon-rw": ("falcon", {"alibi": True, "multi_query": False, "parallel_attn": False, "bias": True,
                             "num_attention_heads": 16}),
    # the gated norm over each group, after the gate (the hub's checkpoints)
    "falcon_h1": ("falcon_h1", {**FALCON_H1, "mamba_rms_norm": True, "mamba_norm_before_gate": False}),
    # mamba_d_ssm from mamba_expand, one group, the gated norm before the gate (transformers' default), every bias
    "falcon_h1-tied-biases": ("falcon_h1", {**FALCON_H1, "mamba_d_ssm": None, "mamba_n_heads": 8, "mamba_n_groups": 1,
                                            "mamba_rms_norm": True, "tie_word_embeddings": True, "attention_bias": True,
                                            "mlp_bias": True, "mamba_proj_bias": True, "projectors_bias": True,
                                            "mamba_conv_bias": False}),
    "falcon_h1-no-norm": ("falcon_h1", {**FALCON_H1, "mamba_rms_norm": False,
                                        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
    "granitemoe": ("granitemoe", {"num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 2.0,
                                  "residual_multiplier": 0.5, "attention_multiplier": 0.1, "logits_scaling": 4.0,
                                  "tie_word_embeddings": True}),
    # Mamba-2 and attention layers (rope), the experts beside the shared MLP, Granite's multipliers
    "granitemoehybrid": ("granitemoehybrid", {
        **MAMBA2, "layer_types": ["mamba", "attention", "mamba", "mamba"], "position_embedding_type": "rope",
        "num_local_experts": 4, "shared_intermediate_size": 48, "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5, "attention_multiplier": 0.1, "logits_scaling": 4.0}),
    # dense (the shared MLP alone), attention without rope, as the hub's Granite 4 H models; one group of heads
    "granitemoehybrid-dense-nope": ("granitemoehybrid", {
        **MAMBA2, "mamba_n_groups": 1, "layer_types": ["attention", "mamba", "mamba", "attention"],
        "position_embedding_type": "nope", "num_local_experts": 0, "shared_intermediate_size": 96,
        "tie_word_embeddings": True}),
    # transformers' YaRN (truncate false), sinks, the experts' clamps biting (swiglu_limit)
    "gpt_oss": ("gpt_oss", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 24,
                            "swiglu_limit": 0.6}),
    "gpt_oss-yarn-truncated": ("gpt_oss", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
                                           "sliding_window": 24, "rope_parameters": {
                                               "rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                               "original_max_position_embeddings": 32}}),
    # dense and mixture of experts layers alternating, rope and chunked attention in every other layer, the
    # others' temperature tuned from position 3 on (floor_scale)
    "llama4_text": ("llama4_text", {"head_dim": 16, "intermediate_size": 32, "intermediate_size_mlp": 128,
                                    "num_local_experts": 4, "num_experts_per_tok": 2, "interleave_moe_layer_step": 2,
                                    "no_rope_layer_interval": 2, "attention_chunk_size": 16, "floor_scale": 4}),
    # a dense layer among the mixtures of experts, weights not renormalized; attention in layers 1 and 3
    "qwen3_next": ("qwen3_next", {**GATED_DELTA, **QWEN_MOE, "mlp_only_layers": [2], "norm_topk_prob": False,
                                  "layer_types": ["linear_attention", "full_attention"] * 2}),
    # as many value heads as key heads; a kernel of 3; biased attention, half of each head turned by rope
    "qwen3_5_text": ("qwen3_5_text", {**GATED_DELTA, "linear_num_value_heads": 2, "linear_conv_kernel_dim": 3,
                                      "attention_bias": True, "rope_parameters": {
                                          "rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}}),
    "qwen3_5_moe_text": ("qwen3_5_moe_text", {**GATED_DELTA, **QWEN_MOE, "tie_word_embeddings": True}),
    "qwen3_5": ("qwen3_5", GATED_DELTA),
    "qwen3_5_moe": ("qwen3_5_moe", {**GATED_DELTA, **QWEN_MOE}),
    "llama4_text-llama3-rope": ("llama4_text", {"head_dim": 16, "intermediate_size": 32, "num_local_experts": 4,
                                                "use_qk_norm": False, "attention_chunk_size": None,
                                                "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}}),
    # short convolutions and attention; the first layer's cache a StateCache
    "lfm2": ("lfm2", {"layer_types": LFM2_LAYERS}),
    # biases, five taps, an attention layer first; the MLP's width adjusted otherwise
    "lfm2-conv-bias": ("lfm2", {"layer_types": LFM2_LAYERS[::-1], "conv_bias": True, "conv_L_cache": 5,
                                "block_ffn_dim_multiplier": 1.5, "block_multiple_of": 48}),
    "lfm2_moe": ("lfm2_moe", {"layer_types": LFM2_LAYERS, "num_experts": 4, "num_experts_per_tok": 2,
                              "moe_intermediate_size": 32, "num_dense_layers": 1, "routed_scaling_factor": 2.0}),
    "lfm2_vl": ("lfm2_vl", {"layer_types": LFM2_LAYERS}),
    "lfm2_moe-no-expert-bias": ("lfm2_moe", {"layer_types": LFM2_LAYERS, "num_experts": 4, "num_experts_per_tok": 3,
                                             "moe_intermediate_size": 32, "use_expert_bias": False,
                                             "norm_topk_prob": False}),
}
LENGTH, PROMPT = 60, 20  # from the prompt to LENGTH: the sliding window and the ropes' original context


def reference_logits(model, tokens, prompt=None):
    """transformers' logits of the whole sequence at once, or (prompt) of the prompt, then one token at a
    time with its KV cache."""
    with torch.no_grad():
        if prompt is None:
            return model(torch.tensor(tokens)).logits.numpy()
        out = model(torch.tensor(tokens)[:, :prompt], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for i in range(prompt, len(tokens[0])):
            out = model(torch.tensor(tokens)[:, i:i + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
        return torch.cat(steps, dim=1).numpy()


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_transformers(make_checkpoint, name, monkeypatch):
    monkeypatch.setattr(models.GatedDeltaNet, "chunk_size", 16)  # linear attention's prompt spans chunks
    model_type, overrides = CONFIGS[name]
    path, reference = make_checkpoint(model_type, **overrides)
    model, _, _ = utils.load(str(path))
    tokens = np.random.default_rng(0).integers(3, 300, (2, LENGTH)).tolist()
    expected = reference_logits(reference, tokens)
    assert np.abs(np.array(model(mx.array(tokens))) - expected).max() <= FP32_ATOL

    # with the KV cache: a prompt, then one token at a time (Phi-3's longrope switches frequencies on the
    # way, for the new tokens only, so transformers runs the same way)
    cache = model.make_cache()
    steps = [model(mx.array(tokens)[:, :PROMPT], cache)]
    steps += [model(mx.array(tokens)[:, i:i + 1], cache) for i in range(PROMPT, LENGTH)]
    expected = reference_logits(reference, tokens, PROMPT)
    assert np.abs(np.array(mx.concatenate(steps, axis=1)) - expected).max() <= FP32_ATOL
    assert cache[0].offset == LENGTH  # which Model.run_layers reads, whatever the first layer's kind


def test_mamba2_mixer_matches_transformers(make_checkpoint):
    """Mamba2Mixer against transformers' reference path in torch (GraniteMoeHybridMambaLayer's) over more than a
    chunk: the whole sequence at once (the chunked scan), and a prompt, two positions, then one at a time with the
    state in a StateCache (the chunked scan from a state, then the step form); time steps clipped to bounds that
    bite (time_step_limit; transformers clips only in its chunked form)."""
    path, reference = make_checkpoint("granitemoehybrid", **CONFIGS["granitemoehybrid"][1])
    theirs = reference.model.layers[0].mamba
    mixer = models.Mamba2Mixer(models.ModelArgs.from_config(json.loads((path / "config.json").read_text())))
    mixer.load_weights([(k, mx.array(v.numpy())) for k, v in theirs.state_dict().items()])
    x = np.random.default_rng(0).normal(size=(2, LENGTH, 64)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.tensor(x)).numpy()
    assert np.abs(np.array(mixer(mx.array(x))) - expected).max() <= FP32_ATOL
    cache = models.StateCache()
    steps = [mixer(mx.array(x[:, :PROMPT]), cache), mixer(mx.array(x[:, PROMPT:PROMPT + 2]), cache)]
    steps += [mixer(mx.array(x[:, i:i + 1]), cache) for i in range(PROMPT + 2, LENGTH)]
    assert np.abs(np.array(mx.concatenate(steps, axis=1)) - expected).max() <= FP32_ATOL
    theirs.time_step_limit = mixer.time_step_limit = (0.005, 0.02)
    with torch.no_grad():
        expected = theirs(torch.tensor(x)).numpy()
    assert np.abs(np.array(mixer(mx.array(x))) - expected).max() <= FP32_ATOL


@pytest.mark.parametrize("name", ["llama3-rope", "phi-2", "phi3-longrope-partial"])
def test_config_layouts_read_alike(make_checkpoint, name):
    """transformers 5 writes rope_parameters; transformers 4 (most hub checkpoints) rope_theta,
    partial_rotary_factor and original_max_position_embeddings at the top, the rest in rope_scaling, where
    Phi-3's longrope was called su."""
    path, _ = make_checkpoint(CONFIGS[name][0], **CONFIGS[name][1])
    v5 = json.loads((path / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "partial_rotary_factor")}
    rope = dict(v5["rope_parameters"])
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["partial_rotary_factor"] = rope.pop("partial_rotary_factor", 1.0)
    if rope.get("rope_type") == "longrope":
        rope = dict(rope, type="su")
        v4["original_max_position_embeddings"] = rope.pop("original_max_position_embeddings")
        del rope["rope_type"]
    v4["rope_scaling"] = rope if rope.get("rope_type", rope.get("type")) != "default" else None
    a, b = models.ModelArgs.from_config(v5), models.ModelArgs.from_config(v4)
    factor = CONFIGS[name][1].get("partial_rotary_factor", 1.0)
    assert a.rope == b.rope and a.rope.get("partial_rotary_factor", 1.0) == factor
    assert a.rope_type == b.rope_type == {"llama3-rope": "llama3", "phi-2": "default"}.get(name, "longrope")
    ropes = models.RoPE(a, a.rope), models.RoPE(b, b.rope)
    assert ropes[0].dims == ropes[1].dims and ropes[0].original_context == ropes[1].original_context
    for key in ("_freqs", "_long_freqs", "_gain"):
        x, y = (getattr(r, key) for r in ropes)
        assert (x is None and y is None) or np.array_equal(x, y)


@pytest.mark.parametrize("model_type", ["cohere", "cohere2", "starcoder2", "glm", "glm4"])
@pytest.mark.parametrize("layout", [{}, {"rope_theta": 2e4}, {"rope_theta": 2e4, "partial_rotary_factor": 0.25},
                                    {"rope_parameters": {"rope_type": "default", "rope_theta": 2e4}}])
def test_rope_defaults_read_as_transformers_reads_them(model_type, layout):
    """Each family's own defaults where a config gives no rope_theta (Cohere's 500000) or partial_rotary_factor
    (GLM's 0.5), in either layout."""
    import transformers

    if model_type not in ("glm", "glm4") and "partial_rotary_factor" in layout:
        pytest.skip("their default rope rotates every feature, whatever partial_rotary_factor says")
    theirs = transformers.AutoConfig.for_model(model_type, **TINY, vocab_size=300, **layout).rope_parameters
    ours = models.ModelArgs.from_config({**TINY, "model_type": model_type, "vocab_size": 300, **layout}).rope
    assert {"rope_theta": 10000.0, **ours} == {"partial_rotary_factor": 1.0, **theirs}  # RoPE's default base


def test_cohere2_rotates_only_where_a_layer_has_a_window():
    """Cohere 2's attention rotates q and k in the layers that slide alone, and in none if sliding_window is
    null (a config transformers 5 cannot run: its masks need the window)."""
    config = {**TINY, "model_type": "cohere2", "vocab_size": 300}
    assert models.ModelArgs.from_config(config).rope_layers == [True, True, True, False]
    assert models.ModelArgs.from_config({**config, "sliding_window": None}).rope_layers == [False] * 4
@pytest.mark.parametrize("overrides", [{"max_window_layers": 3}, {"max_window_layers": 1},
                                       {"use_sliding_window": False}])
def test_qwen2_moe_slides_as_transformers_derives_it(make_checkpoint, overrides):
    """Without layer_types (transformers 4's configs), Qwen2-MoE's sliding layers are every other one below
    max_window_layers (Qwen2's are those from it on)."""
    import transformers

    path, _ = make_checkpoint("qwen2_moe", **{**CONFIGS["qwen2_moe"][1], **overrides})
    config = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k != "layer_types"}
    theirs = transformers.AutoConfig.for_model(**config)
    windows = [theirs.sliding_window if kind == "sliding_attention" else None for kind in theirs.layer_types]
    assert [window for window, _ in models.Model(models.ModelArgs.from_config(config))._layer_masks] == windows


def test_qwen3_moe_reads_either_name_of_its_expert_count(make_checkpoint):
    """transformers 5 writes num_local_experts, the hub's configs num_experts."""
    path, _ = make_checkpoint("qwen3_moe", **CONFIGS["qwen3_moe"][1])
    v5 = json.loads((path / "config.json").read_text())
    hub = {**{k: v for k, v in v5.items() if k != "num_local_experts"}, "num_experts": v5["num_local_experts"]}
    assert models.ModelArgs.from_config(v5) == models.ModelArgs.from_config(hub)


def test_experts_route_on_the_device(make_checkpoint):
    """A mixture of experts chooses and runs each token's experts on the device: its forward pass compiles (so
    does a training step), to the logits it gives uncompiled, over rows sorted by expert (many tokens) or not."""
    path, _ = make_checkpoint("qwen3_moe", **CONFIGS["qwen3_moe"][1])
    model = utils.load(str(path))[0]
    compiled = mx.compile(lambda tokens: model(tokens))
    for shape in ((2, 40), (1, 3)):
        tokens = mx.array(np.random.default_rng(0).integers(3, 300, shape))
        assert np.abs(np.array(compiled(tokens)) - np.array(model(tokens))).max() <= 1e-5


@pytest.mark.parametrize("by_example", [True, False])
def test_packed_examples_keep_their_alibi_positions(by_example):
    """ALiBi's biases, rounded in bfloat16 as transformers rounds them, count positions from each packed example's
    start: a packed row computes what its examples apart do, in either packing layout."""
    args = models.ModelArgs.from_config({**CONFIGS["falcon-rw"][1], "model_type": "falcon", "hidden_size": 64,
                                         "num_hidden_layers": 2, "vocab_size": 300})
    model = models.Model(args)
    examples = [np.random.default_rng(i).integers(0, 300, n) for i, n in enumerate((7, 40, 5))]
    width, packing = models.packed_layout([len(e) for e in examples], by_example)
    row = np.zeros(width, np.int64)
    row[:sum(map(len, examples))] = np.concatenate(examples)
    packed = np.array(model(mx.array(row[None]), packing=packing))[0]
    start = 0
    for tokens in examples:
        apart = np.array(model(mx.array(tokens[None])))[0]
        assert np.abs(packed[start:start + len(tokens)] - apart).max() <= FP32_ATOL
        start += len(tokens)
@pytest.mark.parametrize("model_type, config", [
    ("gpt_oss", {}),  # no rope parameters: transformers installs gpt-oss's YaRN
    ("gpt_oss", {"rope_theta": 1e4, "rope_scaling": None}),  # transformers 4's layout, likewise
    ("gpt_oss", {"rope_theta": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama4_text", {"moe_layers": [1, 2], "no_rope_layers": [1, 0, 1, 1], "attention_chunk_size": None}),
    ("llama4_text", {"interleave_moe_layer_step": 2, "use_qk_norm": False, "rope_theta": 1e4}),
])
def test_derived_fields_read_as_transformers_derives_them(model_type, config):
    """Rope parameters, layer types, which layers use rope and which hold the experts, from what the config
    leaves out."""
    import transformers

    config = {**TINY, "vocab_size": 300, **config}
    reference = transformers.AutoConfig.for_model(model_type, **config)
    args = models.ModelArgs.from_config({"model_type": model_type, **config})
    assert {k: v for k, v in args.rope.items() if k != "partial_rotary_factor"} == reference.rope_parameters
    assert args.layer_types == reference.layer_types
    if model_type == "llama4_text":
        assert args.moe_layers == [i in reference.moe_layers for i in range(args.num_hidden_layers)]
        assert args.rope_layers == [bool(x) for x in reference.no_rope_layers]
        assert args.qk_l2_norm == reference.use_qk_norm


@pytest.mark.parametrize("config", [
    {"full_attn_idxs": [1, 3], "block_ff_dim": 1000, "tie_embedding": False},  # the hub's names (transformers 4)
    {"layer_types": ["full_attention", "conv"] * 2, "block_ffn_dim_multiplier": 1.5, "block_multiple_of": 48},
    {"block_auto_adjust_ff_dim": False, "norm_eps": 1e-3},
    {"num_hidden_layers": 3},  # neither layer_types nor full_attn_idxs: every layer attends
])
def test_lfm2_config_reads_as_transformers_reads_it(config):
    """LFM2's layers' types, MLP width, tying and norms' eps, from its own names."""
    import transformers
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

    config = {**TINY, "vocab_size": 300, **config}
    reference = transformers.AutoConfig.for_model("lfm2", **config)
    args = models.ModelArgs.from_config({"model_type": "lfm2", **config})
    assert args.layer_types == reference.layer_types
    assert args.intermediate_size == Lfm2MLP(reference).w1.out_features
    assert args.tie_word_embeddings == reference.tie_word_embeddings
    assert args.rms_norm_eps == reference.norm_eps


def test_short_convolution_is_the_same_on_every_device(monkeypatch):
    """causal_conv's two forms, the CPU's (shifted products) and mx.conv1d's (elsewhere), and their gradients."""
    x, weight, probe = mx.random.normal((2, 3 + 40, 8)), mx.random.normal((8, 1, 4)), mx.random.normal((2, 40, 8))

    def value_and_grad():
        return mx.value_and_grad(lambda x, w: (models.causal_conv(x, w) * probe).sum(), argnums=(0, 1))(x, weight)

    (cpu, cpu_grad) = value_and_grad()
    monkeypatch.setattr(models.mx, "default_device", lambda: mx.gpu)
    (other, other_grad) = value_and_grad()
    assert abs(cpu.item() - other.item()) <= 1e-4 * abs(cpu.item())
    assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(cpu_grad, other_grad))


def test_llama4_reads_the_hubs_temperature_tuning():
    """The Hub's Llama 4 configs give attn_temperature_tuning as a number (4), which transformers' strict config
    refuses; any true value turns it on."""
    args = models.ModelArgs.from_config({"model_type": "llama4_text", **TINY, "vocab_size": 300,
                                         "attn_temperature_tuning": 4})
    assert args.attn_temperature_tuning is True


@pytest.mark.parametrize("field, value", [
    ("mamba_d_head", 24), ("mamba_n_groups", 3), ("mamba_n_heads", "many"), ("time_step_limit", [0.1, 0.01]),
    ("time_step_limit", [0.0, {"__float__": "Huge"}]), ("layer_types", "mamba"), ("position_embedding_type", "alibi"),
    ("hidden_act", "xielu")])
def test_granite4_config_errors_name_the_field(field, value):
    """Mamba-2 sizes that do not fit together, time step bounds that are no interval, a setting not implemented."""
    with pytest.raises(ValueError, match=f"^{field} "):
        models.ModelArgs.from_config({"model_type": "granitemoehybrid", **TINY, "vocab_size": 300, **MAMBA2,
                                      field: value})


def test_gpt_oss_refuses_mxfp4_experts():
    with pytest.raises(ValueError, match="^quantization_config: MXFP4"):
        models.ModelArgs.from_config({"model_type": "gpt_oss", **TINY, "vocab_size": 300,
                                      "quantization_config": {"quant_method": "mxfp4"}})


# the Hub's configs, abridged: DeepSeek-V3's (transformers 4's layout, yarn over 40 times the context) and V2-Lite's
DEEPSEEK_V3_HUB = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"}, "vocab_size": 129280}
DEEPSEEK_V2_LITE_HUB = {
    **DEEPSEEK_V3_HUB, "model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0, "q_lora_rank": None,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "vocab_size": 102400, "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096, "type": "yarn"}}


@pytest.mark.parametrize("config", [DEEPSEEK_V3_HUB, DEEPSEEK_V2_LITE_HUB], ids=["v3", "v2-lite"])
def test_deepseek_hub_configs_read_as_transformers_reads_them(config):
    """Yarn's frequencies and gain on the rope features, its mscale_all_dim in the softmax's scale, the layers with
    experts, the queries' bottleneck (none in V2-Lite)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale

    theirs = transformers.AutoConfig.for_model(**config)
    args = models.ModelArgs.from_config(config)
    attention = models.LatentAttention(args, 0)  # (its layers' weights are never computed)
    inv_freq, gain = ROPE_INIT_FUNCTIONS["yarn"](theirs)
    assert np.allclose(1 / np.array(attention.rope._freqs), inv_freq.numpy(), rtol=1e-6)
    assert math.isclose(attention.rope.gain, gain)
    assert math.isclose(attention.scale, yarn_apply_mscale(theirs.rope_parameters, theirs.qk_head_dim ** -0.5))
    assert args.moe_layers == [i >= theirs.first_k_dense_replace for i in range(theirs.num_hidden_layers)]
    assert ("q_proj" in attention) == (theirs.q_lora_rank is None)


def test_sarvam_mla_reads_its_first_configs_as_transformers_reads_them():
    """Sarvam-105B's first config layout (for its own code): the experts named num_experts and num_shared_experts,
    yarn deepseek_yarn, head_dim the latent's (unused)."""
    import transformers

    first = {**TINY, **DEEPSEEK, "model_type": "sarvam_mla", "vocab_size": 300, "num_experts": 4,
             "num_shared_experts": 3, "head_dim": 40, "rope_theta": 1e4,
             "rope_scaling": {**DEEPSEEK_YARN, "type": "deepseek_yarn", "mscale_all_dim": 0.7}}
    del first["n_routed_experts"], first["rope_scaling"]["rope_type"], first["rope_scaling"]["rope_theta"]
    theirs = transformers.AutoConfig.for_model(**first)
    args = models.ModelArgs.from_config(first)
    assert args.rope == {**theirs.rope_parameters, "partial_rotary_factor": 1.0}
    assert (args.num_local_experts, args.shared_expert_intermediate_size) == (
        theirs.n_routed_experts, theirs.n_shared_experts * theirs.moe_intermediate_size) == (4, 96)


@pytest.mark.parametrize("model_type, config", [
    ("deepseek_v3", {"scoring_func": "softmax"}), ("deepseek_v3", {"topk_method": "greedy"}),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}), ("deepseek_v3", {"num_key_value_heads": 2}),
    ("deepseek_v3", {"moe_layer_freq": 2}), ("deepseek_v2", {"partial_rotary_factor": 0.5}),
    ("deepseek_v2", {"topk_method": "noaux_tc"}), ("deepseek_v2", {"scoring_func": "sigmoid"}),
    ("deepseek_v2", {"norm_topk_prob": True}), ("deepseek_v2", {"num_experts_per_tok": None}),
])
def test_deepseek_refuses_what_it_does_not_compute(model_type, config):
    """A router, a rope or weights that transformers computes otherwise (or not at all) are an error naming the
    field."""
    with pytest.raises(ValueError, match=f"^{next(iter(config))}"):
        models.ModelArgs.from_config({**TINY, **DEEPSEEK, "model_type": model_type, "vocab_size": 300, **config})
@pytest.mark.parametrize("heads", [(2, 2), (2, 4)])
def test_gated_delta_rule_matches_transformers(heads):
    """The gated delta rule's chunked form (training, prompts) and step form (generation) against transformers'
    torch references, from a given state, over more than one chunk (of 16 positions) and part of one; the value
    heads read their key head's queries and keys."""
    from transformers.models.qwen3_next import modeling_qwen3_next as reference

    key_heads, value_heads = heads
    rng = np.random.default_rng(0)
    q, k = (rng.normal(size=(2, LENGTH, key_heads, 16)).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(2, LENGTH, value_heads, 8)).astype(np.float32)
    g = -rng.uniform(0, 0.3, (2, LENGTH, value_heads)).astype(np.float32)  # some decay past a chunk, some not
    beta = rng.uniform(0, 1, (2, LENGTH, value_heads)).astype(np.float32)
    state = rng.normal(size=(2, value_heads, 16, 8)).astype(np.float32)
    tensors = [torch.tensor(x) for x in (q, k, v, g, beta, state)]
    chunked, chunked_state = reference.torch_chunk_gated_delta_rule(
        *tensors[:3], g=tensors[3], beta=tensors[4], chunk_size=16, initial_state=tensors[5], output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    stepped, stepped_state = reference.torch_recurrent_gated_delta_rule(
        *tensors[:3], g=tensors[3], beta=tensors[4], initial_state=tensors[5], output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    assert np.abs(chunked.numpy() - stepped.numpy()).max() < 1e-4  # the two references agree
    # normed to length 1 (queries then by 1/sqrt(16)), each key head's for its value heads, as GatedDeltaNet does
    q, k = (np.repeat(x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6), value_heads // key_heads, axis=2)
            for x in (q, k))
    q = q / 4
    ours, ours_state = models.gated_delta_chunked(*map(mx.array, (q, k, v, g, beta, state)), 16)
    assert np.abs(np.array(ours) - chunked.numpy()).max() < 1e-4
    assert np.abs(np.array(ours_state) - chunked_state.numpy()).max() < 1e-4
    steps, carried = [], mx.array(state)
    for i in range(LENGTH):
        out, carried = models.gated_delta_step(*(mx.array(x[:, i:i + 1]) for x in (q, k, v, g, beta)), carried)
        steps.append(out)
    assert np.abs(np.array(mx.concatenate(steps, axis=1)) - stepped.numpy()).max() < 1e-4
    assert np.abs(np.array(carried) - stepped_state.numpy()).max() < 1e-4


def test_every_family_is_tested():
    assert {model_type for model_type, _ in CONFIGS.values()} | {"phi3_v"} == set(models.FAMILIES)


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match=f"supported: {', '.join(models.FAMILIES)}$"):
        models.ModelArgs.from_config({"model_type": "bert", "hidden_size": 8})


def test_cpu_math_matches_mlx():
    """The CPU's polynomial exp, and the silu, attention and logsumexp built on it."""
    # within float32's normal range: below exp(-87.3) mx.exp gives subnormals, which the polynomial flushes
    x = mx.clip(mx.random.normal((64, 512), key=mx.random.key(0)) * 20, -87, 88)
    assert np.allclose(models.polynomial_exp(x), mx.exp(x), rtol=1e-5, atol=0)
    grad = mx.grad(lambda x: models.polynomial_exp(x).sum())(x)
    assert np.allclose(grad, mx.exp(x), rtol=1e-5, atol=0)
    assert np.allclose(models.silu(x), nn.silu(x), rtol=1e-5, atol=1e-6)
    assert np.allclose(models.logsumexp(x), mx.logsumexp(x, axis=-1), rtol=1e-6)
    q, k, v = (mx.random.normal((2, h, 10, 16)) for h in (4, 2, 2))
    sinks = mx.random.normal((4,))
    for mask in (None, "causal", (mx.random.uniform(shape=(10, 10)) > 0.3) | mx.eye(10, dtype=mx.bool_)):
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
        assert np.allclose(models.attention(q, k, v, 0.25, mask), expected, atol=1e-5)
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask, sinks=sinks)
        assert np.allclose(models.attention(q, k, v, 0.25, mask, sinks=sinks), expected, atol=1e-5)


def test_dequantize_keeps_what_each_layer_computes():
    module = nn.Module()
    module.linear = models.QuantizedLinear.from_linear(nn.Linear(64, 32, bias=True), group_size=32, bits=4)
    module.embedding = models.QuantizedEmbedding.from_embedding(nn.Embedding(50, 64), group_size=32, bits=8)
    x, ids = mx.random.normal((3, 64)), mx.array([[1, 7, 49]])
    before = [module.linear(x), module.embedding(ids), module.embedding.as_linear(x)]
    models.dequantize(module)
    assert type(module.linear) is nn.Linear and type(module.embedding) is nn.Embedding
    after = [module.linear(x), module.embedding(ids), module.embedding.as_linear(x)]
    for b, a in zip(before, after):
        assert np.abs(np.array(a - b)).max() < FP32_ATOL


def test_family_config_names_and_defaults_read_as_transformers_reads_them():
    """Apertus and Ministral 3 ignore a top-level rope_theta without rope_scaling (their default rope then);
    InternLM3's qkv_bias and bias are Llama's attention_bias and mlp_bias; EXAONE 4's pattern, without
    layer_types, is a number of layers."""
    import transformers

    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 300, "head_dim": 16}
    for model_type in ("apertus", "ministral3"):
        config = {**tiny, "rope_theta": 5e5}
        theirs = transformers.AutoConfig.for_model(model_type, **config).rope_parameters
        ours = models.ModelArgs.from_config({**config, "model_type": model_type})
        assert all(theirs[k] == v for k, v in ours.rope.items() if k != "partial_rotary_factor"), (theirs, ours.rope)
        assert ours.query_scaling == ((0.1, 16384, 0) if model_type == "ministral3" else None)
    theirs = transformers.AutoConfig.for_model("internlm3", **tiny, qkv_bias=True, bias=True)
    ours = models.ModelArgs.from_config({**tiny, "model_type": "internlm3", "qkv_bias": True, "bias": True})
    assert ours.attention_bias == theirs.attention_bias and ours.mlp_bias == theirs.mlp_bias is True
    with pytest.raises(ValueError, match="qkv_bias"):
        models.ModelArgs.from_config({**tiny, "model_type": "internlm3", "qkv_bias": True, "bias": False})
    with pytest.raises(ValueError, match="sliding_window_pattern"):
        models.ModelArgs.from_config({**tiny, "model_type": "exaone4", "sliding_window_pattern": "LLLG"})


@pytest.mark.parametrize("mask", ["causal", None, "boolean", "additive", "padding"])
def test_attention_in_chunks_of_queries_is_attention_whole(mask, monkeypatch):
    """Queries beyond models.ATTENTION_QUERIES attend in chunks (causal ones to the keys up to their last): the
    output and the gradients are those of all the queries at once, on the device and on the CPU, with sinks and
    a soft cap too; more keys than queries (a cache) too."""
    B, H, KH, L, KL, D = 2, 4, 2, 11, 14, 8
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.normal(size=(B, h, n, D)).astype(np.float32)) for h, n in ((H, L), (KH, KL), (KH, KL)))
    masks = {"boolean": mx.array(rng.random((B, 1, L, KL)) < 0.7) | (mx.arange(KL) == 0),
             "additive": mx.array(rng.normal(size=(B, H, L, KL)).astype(np.float32)),
             "padding": mx.array(rng.random((B, 1, 1, KL)) < 0.8) | (mx.arange(KL) == 0)}
    mask = masks.get(mask, mask)
    sinks = mx.array(rng.normal(size=(H,)).astype(np.float32))
    for device, softcap in ((mx.default_device(), None), (mx.cpu, 5.0)):
        def loss(q, k, v):
            with mx.stream(device):
                out = models.attention(q, k, v, D ** -0.5, mask, softcap, sinks)
            return (out * mx.arange(out.size).reshape(out.shape) / out.size).sum(), out

        results = []
        for queries in (L, 4):
            monkeypatch.setattr(models, "ATTENTION_QUERIES", queries)
            (_, out), grads = mx.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
            results.append((out, *grads))
        for whole, chunked in zip(*results):
            assert np.allclose(np.array(whole), np.array(chunked), atol=1e-5)
