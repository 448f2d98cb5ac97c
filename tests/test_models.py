"""models.py against transformers' PyTorch implementation on the same random weights (fp32)."""
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

import models
import utils
from conftest import FP32_ATOL

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
CONFIGS = {
    "llama-gqa": ("llama", {}),
    "llama-tied-mha": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_theta": 500.0}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 50000.0}),
    "llama-head-dim-bias": ("llama", {"head_dim": 32, "attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {"rope_theta": 1e6}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 24}),
}
LENGTH = 60  # beyond the sliding window and the llama3 rope's original context


def reference_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_transformers(make_checkpoint, name):
    model_type, overrides = CONFIGS[name]
    path, reference = make_checkpoint(model_type, **overrides)
    model, _, _ = utils.load(str(path))
    tokens = np.random.default_rng(0).integers(3, 300, (2, LENGTH)).tolist()
    expected = reference_logits(reference, tokens)
    assert np.abs(np.array(model(mx.array(tokens))) - expected).max() <= FP32_ATOL

    # with the KV cache: a prompt, then one token at a time
    cache = model.make_cache()
    steps = [model(mx.array(tokens)[:, :40], cache)]
    steps += [model(mx.array(tokens)[:, i:i + 1], cache) for i in range(40, LENGTH)]
    assert np.abs(np.array(mx.concatenate(steps, axis=1)) - expected).max() <= FP32_ATOL


def test_config_layouts_read_alike(make_checkpoint):
    """transformers 5 writes rope_parameters; transformers 4 (most hub checkpoints) rope_theta/rope_scaling."""
    path, _ = make_checkpoint("llama", rope_scaling=LLAMA3_ROPE, rope_theta=50000.0)
    v5 = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in v5
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    rope = dict(v5["rope_parameters"])
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = rope
    a, b = models.ModelArgs.from_config(v5), models.ModelArgs.from_config(v4)
    assert a == b and a.rope_theta == 50000.0 and a.rope_scaling["rope_type"] == "llama3"
    assert np.allclose(models.rope_frequencies(a), models.rope_frequencies(b))


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match="supported: llama, mistral"):
        models.ModelArgs.from_config({"model_type": "bert", "hidden_size": 8})


def test_cpu_math_matches_mlx():
    """The CPU's polynomial exp, and the silu, attention and logsumexp built on it."""
    x = mx.random.normal((64, 512)) * 20
    assert np.allclose(models.polynomial_exp(x), mx.exp(x), rtol=1e-5, atol=0)
    grad = mx.grad(lambda x: models.polynomial_exp(x).sum())(x)
    assert np.allclose(grad, mx.exp(x), rtol=1e-5, atol=0)
    assert np.allclose(models.silu(x), nn.silu(x), rtol=1e-5, atol=1e-6)
    assert np.allclose(models.logsumexp(x), mx.logsumexp(x, axis=-1), rtol=1e-6)
    q, k, v = (mx.random.normal((2, h, 10, 16)) for h in (4, 2, 2))
    for mask in (None, "causal", (mx.random.uniform(shape=(10, 10)) > 0.3) | mx.eye(10, dtype=mx.bool_)):
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
        assert np.allclose(models.attention(q, k, v, 0.25, mask), expected, atol=1e-5)


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
