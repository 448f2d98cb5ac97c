"""One decoder for the Llama family (Llama 1-3, Mistral), configured from a Hugging Face config.json,
and the LoRALinear wrapper. Parameter names follow Hugging Face's, so checkpoints load without renaming."""
import math
from dataclasses import dataclass, fields
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None
    hidden_act: str = "silu"

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        config = dict(config)
        if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {config.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        # transformers 5 moved rope_theta and rope_scaling into rope_parameters.
        rope = config.pop("rope_parameters", None) or {}
        if "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
        names = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in config.items() if k in names})
        args.num_key_value_heads = args.num_key_value_heads or args.num_attention_heads
        args.head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
        return args

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))


def rope_frequencies(args: ModelArgs) -> mx.array:
    """The rotary wavelengths / 2pi (what mx.fast.rope takes as freqs), with Hugging Face's scaling kinds."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling, kind = args.rope_scaling or {}, args.rope_type
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
    return mx.array(1.0 / inv_freq, dtype=mx.float32)


def dequantized_weight(layer, dtype):
    return mx.dequantize(
        layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits, dtype=dtype
    )


# MLX's CPU quantized matmul runs at about 1.5 GFLOP/s, against 90-200 for fp32 BLAS: on the CPU a
# quantized layer dequantizes its weight for products over many rows (training, prompts), keeping the model
# 4-bit at rest. For a few rows (generating one token) the quantized matmul is the faster of the two.
def dequantizes(x):
    return mx.default_device() == mx.cpu and x.size // x.shape[-1] > 8


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        if not dequantizes(x):
            return super().__call__(x)
        y = x @ dequantized_weight(self, x.dtype).T
        return y + self.bias if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x):
        if not dequantizes(x):
            return super().as_linear(x)
        return x @ dequantized_weight(self, x.dtype).T


def quantize(model: nn.Module, layer_params):
    """Quantize the Linear and Embedding layers for which layer_params(path, module) gives
    {"group_size", "bits"} (None leaves a layer as it is)."""
    replaced = []
    for path, module in model.named_modules():
        params = layer_params(path, module)
        if params is None:
            continue
        if isinstance(module, nn.Linear):
            replaced.append((path, QuantizedLinear.from_linear(module, **params)))
        elif isinstance(module, nn.Embedding):
            replaced.append((path, QuantizedEmbedding.from_embedding(module, **params)))
    model.update_modules(tree_unflatten(replaced))


def dequantize(model: nn.Module, dtype=mx.float32):
    """Replace every quantized layer by its float equivalent (for export, or a float reference)."""
    replaced = []
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            output_dims = module.weight.shape[0]
            linear = nn.Linear(module.scales.shape[-1] * module.group_size, output_dims, bias="bias" in module)
            linear.weight = dequantized_weight(module, dtype)
            if "bias" in module:
                linear.bias = module.bias
            replaced.append((path, linear))
        elif isinstance(module, nn.QuantizedEmbedding):
            weight = dequantized_weight(module, dtype)
            embedding = nn.Embedding(*weight.shape)
            embedding.weight = weight
            replaced.append((path, embedding))
    model.update_modules(tree_unflatten(replaced))


# MLX's Linux CPU wheel evaluates exp one element at a time, at about 12 ns (sigmoid, softmax and logsumexp
# with it): 0.75 s of a 2.5 s SmolLM2 training step. On the CPU, exp is instead 2^x from a degree-6
# polynomial and the exponent's bits (relative error < 4e-6), which mx.compile fuses with its neighbours:
# 5x faster.
@mx.custom_function
def polynomial_exp(x):
    x = mx.clip(x * 1.4426950408889634, -126.0, 126.0)
    n = (x + 12582912.0) - 12582912.0  # x rounded to an integer (1.5 * 2^23 drops the fraction): |f| <= 1/2
    f = x - n
    p = 1.0 + f * (0.6931471805599453 + f * (0.2402265069591007 + f * (0.05550410866482158 + f * (
        0.009618129107628477 + f * (0.0013333558146428443 + f * 0.00015403530393381606)))))
    return p * ((n.astype(mx.int32) + 127) << 23).view(mx.float32).astype(p.dtype)


@polynomial_exp.vjp
def polynomial_exp_vjp(primals, cotangent, output):
    return cotangent * output


def exp(x):
    return polynomial_exp(x) if mx.default_device() == mx.cpu else mx.exp(x)


def silu(x):
    return nn.silu(x) if mx.default_device() != mx.cpu else x / (1.0 + exp(-x))


def logsumexp(x):
    """Over the last axis."""
    if mx.default_device() != mx.cpu:
        return mx.logsumexp(x, axis=-1)
    top = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return mx.log(exp(x - top).sum(axis=-1)) + top[..., 0]


def attention(q, k, v, scale, mask):
    """Scaled dot-product attention with grouped K/V heads; mask: None, "causal" or a boolean array."""
    if mx.default_device() != mx.cpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    B, H, L, D = q.shape
    k_heads, length = k.shape[1], k.shape[2]
    scores = (q.reshape(B, k_heads, H // k_heads, L, D) * scale) @ k[:, :, None].swapaxes(-1, -2)
    if isinstance(mask, str):
        mask = mx.arange(length - L, length)[:, None] >= mx.arange(length)[None]
    if mask is not None:
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    weights = exp(scores - mx.stop_gradient(scores.max(axis=-1, keepdims=True)))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return (weights @ v[:, :, None]).reshape(B, H, L, D)


class KVCache:
    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def update(self, keys, values):
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys, values
        self.offset = keys.shape[2]
        return keys, values


def attention_mask(length: int, offset: int, window: Optional[int]):
    """Causal mask for `length` queries after `offset` cached positions, limited to a sliding window."""
    if window is None or offset + length <= window:
        return "causal" if length > 1 else None
    query = mx.arange(offset, offset + length)[:, None]
    key = mx.arange(offset + length)[None]
    return (key <= query) & (key > query - window)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        self._rope_freqs = rope_frequencies(args)

    def rope(self, x, offset):
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0,
                            offset=offset, freqs=self._rope_freqs)

    def __call__(self, x, mask, cache=None):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update(k, v)
        out = attention(q, k, v, self.head_dim**-0.5, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x):
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DecoderStack(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self):
        return self.model.layers

    def hidden_states(self, inputs, cache=None):
        """The final normed hidden states; `cache` is a list of KVCache, one per layer, or None."""
        h = self.model.embed_tokens(inputs)
        offset = cache[0].offset if cache else 0
        mask = attention_mask(h.shape[1], offset, self.args.sliding_window)
        for layer, layer_cache in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, mask, layer_cache)
        return self.model.norm(h)

    def logits(self, h):
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def __call__(self, inputs, cache=None):
        return self.logits(self.hidden_states(inputs, cache))

    def make_cache(self):
        return [KVCache() for _ in self.layers]


class LoRALinear(nn.Module):
    """y = linear(x) + scale * dropout(x) @ lora_a @ lora_b, over a frozen nn.Linear or nn.QuantizedLinear.
    lora_b starts at zero, so an untrained adapter changes nothing."""

    @staticmethod
    def from_linear(linear, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        output_dims, input_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            input_dims = input_dims * 32 // linear.bits
        lora = LoRALinear(input_dims, output_dims, rank, scale, dropout)
        lora.linear = linear
        return lora

    def __init__(self, input_dims, output_dims, rank=8, scale=20.0, dropout=0.0, bias=False):
        super().__init__()
        self.linear = nn.Linear(input_dims, output_dims, bias=bias)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, rank))
        self.lora_b = mx.zeros((rank, output_dims))

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + self.scale * z

    def to_linear(self):
        """The merged layer: W + scale * (lora_a @ lora_b).T, re-quantized like the base if it was."""
        linear = self.linear
        quantized = isinstance(linear, nn.QuantizedLinear)
        weight = dequantized_weight(linear, linear.scales.dtype) if quantized else linear.weight
        delta = self.scale * (self.lora_a @ self.lora_b).T
        output_dims, input_dims = weight.shape
        fused = nn.Linear(input_dims, output_dims, bias="bias" in linear)
        fused.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
        if "bias" in linear:
            fused.bias = linear.bias
        if quantized:
            return QuantizedLinear.from_linear(fused, linear.group_size, linear.bits)
        return fused


def linear_layers(layer: nn.Module) -> list:
    """Module paths of the linear layers inside a decoder layer: the possible LoRA targets."""
    paths = [path for path, m in layer.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    return paths[::-1]  # named_modules() lists the last defined first


def linear_to_lora_layers(model: Model, targets, num_layers: int, rank=8, scale=20.0, dropout=0.0):
    """Wrap the `targets` (paths such as self_attn.q_proj, or their last part) of the last `num_layers`
    decoder layers (-1: all) in LoRALinear."""
    total = len(model.layers)
    if num_layers == -1:
        num_layers = total
    if not 0 < num_layers <= total:
        raise ValueError(f"--lora-layers {num_layers}: the model has {total} layers")
    def matches(path, target):
        return path == target or path.endswith("." + target)

    choices = linear_layers(model.layers[0])
    for target in targets:
        if not any(matches(path, target) for path in choices):
            raise ValueError(f"--lora-targets {target} matches no layer; choices: {', '.join(choices)}")
    for layer in model.layers[total - num_layers:]:
        wrapped = [
            (path, LoRALinear.from_linear(module, rank, scale, dropout))
            for path, module in layer.named_modules()
            if path in choices and any(matches(path, t) for t in targets)
        ]
        layer.update_modules(tree_unflatten(wrapped))
