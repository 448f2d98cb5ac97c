"""One decoder for Llama, Mistral, Mixtral, Qwen2, Gemma, Phi-2 and Phi-3 (and Phi-3-vision's language model),
configured from a Hugging Face config.json, and the LoRALinear and DoRALinear wrappers. Parameter names follow
Hugging Face's, so checkpoints load, fuse and export without renaming. In this order: the configuration, the
decoder and its parts, LoRA and DoRA, then the kernels and device-specific paths."""
import copy
import fnmatch
import math
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten


# Configuration

# model_type: the switches that set a family apart from Llama (ModelArgs' defaults); config.json sets the rest.
FAMILIES = {
    "llama": {},
    "mistral": {},
    "mixtral": {"mlp": "sparse_moe"},
    "qwen2": {"qkv_bias": True},
    "gemma": {"norm": "rms_offset", "scale_embeddings": True, "hidden_act": "gelu_pytorch_tanh",
              "tie_word_embeddings": True},
    "phi": {"norm": "layer", "parallel": True, "mlp": "fc", "attention_bias": True, "mlp_bias": True,
            "lm_head_bias": True, "hidden_act": "gelu_new", "partial_rotary_factor": 0.5,
            "output_proj": "dense", "final_norm": "final_layernorm"},
    "phi3": {"fused": True},
    "phi3_v": {"fused": True, "kept_prefix": "model.vision_embed_tokens."},
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
ROPE_PARAMETERS = ("rope_theta", "partial_rotary_factor")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048
    original_max_position_embeddings: Optional[int] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None
    layer_types: Optional[list] = None  # "full_attention" or "sliding_attention", per layer
    hidden_act: str = "silu"
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    # family switches (FAMILIES)
    norm: str = "rms"  # rms, rms_offset (Gemma: weight + 1), layer (LayerNorm with bias)
    mlp: str = "gated"  # gated (gate, up, down), fc (fc1, fc2), sparse_moe (Mixtral's experts)
    fused: bool = False  # q/k/v in one qkv_proj, gate/up in one gate_up_proj (Phi-3)
    parallel: bool = False  # attention and MLP side by side on one norm's output (Phi-2)
    qkv_bias: bool = False
    lm_head_bias: bool = False
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    output_proj: str = "o_proj"
    final_norm: str = "norm"
    kept_prefix: Optional[str] = None  # weights kept as they are, unused (Phi-3-vision's image encoder)

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        config = dict(config)
        family = FAMILIES.get(config.get("model_type"))
        if family is None:
            raise ValueError(
                f"model_type {config.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        # transformers 5 moved rope_theta, rope_scaling and partial_rotary_factor into rope_parameters.
        rope = config.pop("rope_parameters", None) or config.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_scaling is {rope!r}, expected an object")
        for key in ROPE_PARAMETERS:
            if rope.get(key) is not None:
                config[key] = rope[key]
        config["rope_scaling"] = {k: v for k, v in rope.items() if k not in ROPE_PARAMETERS} or None
        if config["model_type"] == "gemma":  # transformers reads hidden_activation (else tanh-gelu), not hidden_act
            config["hidden_act"] = config.get("hidden_activation") or family["hidden_act"]
        if config["model_type"] == "qwen2":
            layers, window = config.get("num_hidden_layers", 0), config.get("max_window_layers", 0)
            if not config.get("use_sliding_window"):
                config["sliding_window"] = None
            elif config.get("layer_types") is None:
                config["layer_types"] = ["sliding_attention" if i >= window else "full_attention"
                                         for i in range(layers)]
        if config.get("qk_layernorm"):
            raise ValueError("qk_layernorm is not supported")
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in config.items() if k in names and v is not None}
        check_types(given)
        args = cls(**{**family, **given})
        if args.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {args.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        args.num_key_value_heads = args.num_key_value_heads or args.num_attention_heads
        args.head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
        if args.num_attention_heads % args.num_key_value_heads or args.head_dim == 0:
            raise ValueError(f"{args.num_attention_heads} attention heads cannot share {args.num_key_value_heads} "
                             f"key-value heads of {args.head_dim} features")
        if args.layer_types is not None and len(args.layer_types) != args.num_hidden_layers:
            raise ValueError(f"layer_types lists {len(args.layer_types)} layers, not num_hidden_layers "
                             f"{args.num_hidden_layers}")
        return args

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return "longrope" if kind == "su" else kind  # Phi-3's configs call it su


def check_types(config: dict):
    """Each of ModelArgs' fields in `config` of its type and, if a number, positive (num_local_experts: at least
    0); the fields without a default present."""
    missing = [f.name for f in fields(ModelArgs) if f.default is MISSING and f.name not in config]
    if missing:
        raise ValueError(f"{', '.join(missing)} missing")
    for f in fields(ModelArgs):
        value = config.get(f.name)
        kind = next(t for t in (typing.get_args(f.type) or (f.type,)) if t is not type(None))
        if value is None:
            continue
        number = kind in (int, float)
        if (not isinstance(value, (int, float) if kind is float else kind)
                or number and isinstance(value, bool)):
            raise ValueError(f"{f.name} is {value!r}, expected {'a number' if kind is float else kind.__name__}")
        if number and (value < 0 if f.name == "num_local_experts" else value <= 0):
            raise ValueError(f"{f.name} is {value!r}, expected a positive number")


# The decoder


class RoPE(nn.Module):
    """Rotary embedding of the first head_dim * partial_rotary_factor features, with Hugging Face's scaling
    kinds: linear, llama3, and Phi-3's longrope (long-context frequencies once the sequence is longer than
    the original context, and a gain on the rotated features)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dims = int(args.head_dim * args.partial_rotary_factor)
        inv_freq = 1.0 / (args.rope_theta ** (np.arange(0, self.dims, 2, dtype=np.float64) / self.dims))
        scaling, kind = args.rope_scaling or {}, args.rope_type
        self.original_context, self._long_freqs, self._gain = None, None, None
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
        elif kind == "longrope":
            self.original_context = (scaling.get("original_max_position_embeddings")
                                     or args.original_max_position_embeddings or args.max_position_embeddings)
            factor = scaling.get("factor") or args.max_position_embeddings / self.original_context
            gain = scaling.get("attention_factor") or (
                math.sqrt(1 + math.log(factor) / math.log(self.original_context)) if factor > 1 else 1.0)
            if gain != 1.0:  # on cos and sin in transformers: on the rotated features of q and k here
                self._gain = mx.array([gain] * self.dims + [1.0] * (args.head_dim - self.dims))
            self._long_freqs = mx.array(np.array(scaling["long_factor"]) / inv_freq, dtype=mx.float32)
            inv_freq = inv_freq / np.array(scaling["short_factor"])
        elif kind != "default":
            raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3, longrope)")
        self._freqs = mx.array(1.0 / inv_freq, dtype=mx.float32)  # wavelengths / 2pi, as mx.fast.rope takes

    def __call__(self, x, offset: int):
        long = self._long_freqs is not None and offset + x.shape[2] > self.original_context
        if self._gain is not None:
            x = x * self._gain.astype(x.dtype)
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset,
                            freqs=self._long_freqs if long else self._freqs)


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


def attention_mask(length: int, offset: int, window: Optional[int], examples=None):
    """Causal mask for `length` queries after `offset` cached positions, limited to a sliding window; for rows
    packing several examples, also to each query's own example (`examples`: each position's, batch x length)."""
    if examples is None and (window is None or offset + length <= window):
        return "causal" if length > 1 else None
    query = mx.arange(offset, offset + length)[:, None]
    key = mx.arange(offset + length)[None]
    mask = key <= query if window is None else (key <= query) & (key > query - window)
    if examples is None:
        return mask
    return mask & (examples[:, None, :, None] == examples[:, None, None, :])


def packed_layout(lengths, by_example=None):
    """(width, packing) of one row that packs examples of these lengths, padded at its end to `width`:
    `packing` says where each example is, for attention to stay within it (Model.run_layers). Packed examples
    keep their positions in the row: rotary attention depends on relative positions alone.

    On a GPU it is {"examples": each position's example (-1: padding)}, for one mask over the row. On the
    CPU (or by_example), where attention over the whole row costs more than packing saves, it is {"slots",
    "order"}: each example's positions in the row, one example a row (padded), and each position's place in
    those rows read row after row. Each layout's padding maps onto the other's, so that each undoes the other
    wherever a gradient flows (permuted). Widths are rounded up, as each new shape is compiled anew."""
    by_example = mx.default_device() == mx.cpu if by_example is None else by_example
    lengths = np.asarray(lengths)
    multiple = 16 if by_example else 64
    width = -(-(lengths.sum() + 1) // multiple) * multiple
    if not by_example:
        examples = np.full(width, -1, np.int32)
        examples[:lengths.sum()] = np.repeat(np.arange(len(lengths)), lengths)
        return width, {"examples": mx.array(examples[None])}
    longest = -(-(lengths.max() + 1) // 8) * 8
    slots = np.full((len(lengths), longest), width - 1, np.int32)
    order = np.full(width, lengths.argmax() * longest + longest - 1, np.int32)
    for k, (first, n) in enumerate(zip(np.cumsum(lengths) - lengths, lengths)):
        slots[k, :n] = np.arange(first, first + n)
        order[first:first + n] = np.arange(k * longest, k * longest + n)
    return width, {"slots": mx.array(slots), "order": mx.array(order)}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        dim, q_dims, kv_dims = args.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        bias = args.attention_bias or args.qkv_bias
        if args.fused:
            self.qkv_proj = nn.Linear(dim, q_dims + 2 * kv_dims, bias=bias)
        else:
            self.q_proj = nn.Linear(dim, q_dims, bias=bias)
            self.k_proj = nn.Linear(dim, kv_dims, bias=bias)
            self.v_proj = nn.Linear(dim, kv_dims, bias=bias)
        self.output_proj = args.output_proj
        self[self.output_proj] = nn.Linear(q_dims, dim, bias=args.attention_bias)
        self.rope = RoPE(args)

    def __call__(self, x, mask, cache=None, example_rows=None):
        """example_rows: a packed row's {"slots", "order"} (packed_layout), to attend one example a row."""
        if "qkv_proj" in self:
            q_dims, kv_dims = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = mx.split(self.qkv_proj(x), [q_dims, q_dims + kv_dims], axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if example_rows is not None:
            slots, order = example_rows["slots"], example_rows["order"]
            index = slots.reshape(-1)
            q, k, v = (permuted(y[0], index, order).reshape(*slots.shape, -1) for y in (q, k, v))
            out = self.attend(q, k, v, mask, cache)
            return self[self.output_proj](permuted(out.reshape(-1, out.shape[-1]), order, index)[None])
        return self[self.output_proj](self.attend(q, k, v, mask, cache))

    def attend(self, q, k, v, mask, cache):
        B, L, _ = q.shape
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update(k, v)
        out = attention(q, k, v, self.head_dim**-0.5, mask)
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up in one layer if fused (Phi-3); down(act(up(x))) without
    a gate (Phi-2). The layers' names are the checkpoint's."""

    def __init__(self, args: ModelArgs, gate="gate_proj", up="up_proj", down="down_proj"):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate, self.up, self.down = gate, up, down
        if args.fused:
            self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=bias)
        else:
            if gate is not None:
                self[gate] = nn.Linear(dim, hidden, bias=bias)
            self[up] = nn.Linear(dim, hidden, bias=bias)
        self[down] = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, x):
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
            return self[self.down](self.act(gate) * up)
        if self.gate is None:
            return self[self.down](self.act(self[self.up](x)))
        return self[self.down](self.act(self[self.gate](x)) * self[self.up](x))


class SparseMoE(nn.Module):
    """Mixtral's mixture of experts: each token goes through the num_experts_per_tok experts that the
    router (gate) scores highest, weighted by the softmax of those scores."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.experts = [MLP(args, gate="w1", up="w3", down="w2") for _ in range(args.num_local_experts)]

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores = self.gate(x).astype(mx.float32)
        chosen = mx.stop_gradient(mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[:, :self.top_k])
        weights = mx.softmax(mx.take_along_axis(scores, chosen, axis=-1), axis=-1).astype(x.dtype)
        # Each expert computes only its tokens: the routing is read back to the host, so a model with experts
        # trains uncompiled (lora.py); the alternative, every expert on every token, costs experts / top_k
        # times the MLP's work.
        chosen = np.array(chosen)
        y = mx.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tokens, slots = (mx.array(i) for i in np.nonzero(chosen == e))
            if tokens.size:
                y = y.at[tokens].add(expert(x[tokens]) * weights[tokens, slots][:, None])
        return y.reshape(shape)


def norm(args: ModelArgs):
    if args.norm == "layer":
        return nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
    return (OffsetRMSNorm if args.norm == "rms_offset" else nn.RMSNorm)(args.hidden_size, eps=args.rms_norm_eps)


class OffsetRMSNorm(nn.RMSNorm):
    """Gemma's RMSNorm, which scales by 1 + weight."""

    def __call__(self, x):
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        if args.mlp == "sparse_moe":
            self.block_sparse_moe = SparseMoE(args)
        else:
            self.mlp = MLP(args, gate=None, up="fc1", down="fc2") if args.mlp == "fc" else MLP(args)
        self.input_layernorm = norm(args)
        if not args.parallel:
            self.post_attention_layernorm = norm(args)

    def __call__(self, x, mask, cache=None, example_rows=None):
        mlp = self.block_sparse_moe if "block_sparse_moe" in self else self.mlp
        h = self.input_layernorm(x)
        if "post_attention_layernorm" not in self:  # parallel
            return x + self.self_attn(h, mask, cache, example_rows) + mlp(h)
        h = x + self.self_attn(h, mask, cache, example_rows)
        return h + mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self[args.final_norm] = norm(args)


def checkpointed(layer: nn.Module, mask, example_rows):
    """layer(h, ...) as a function of (its trainable parameters, h) that keeps none of its activations for the
    backward pass, where they are computed again: memory for compute."""
    def call(parameters, h):
        layer.update(parameters)
        return layer(h, mask, None, example_rows)

    return mx.checkpoint(call)


@dataclass
class FrozenPrefix:
    """The hidden states entering decoder layer `layer` at every input position of a set of examples, one row
    a position: what the frozen layers below it compute, computed once rather than at every step."""
    layer: int
    states: mx.array


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DecoderStack(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=args.lm_head_bias)
        types = args.layer_types or ["sliding_attention"] * args.num_hidden_layers
        self._layer_windows = [args.sliding_window if t == "sliding_attention" else None for t in types]
        self.grad_checkpoint = False  # recompute each layer's activations in the backward pass (checkpointed)
        # While set (lora.frozen_layers_cached), the inputs are rows of its states, not token ids.
        self.frozen_prefix: Optional[FrozenPrefix] = None

    @property
    def layers(self):
        return self.model.layers

    def keep(self, weights: dict):
        """Hold the weights under args.kept_prefix (which this decoder does not use) as parameters, so that
        they are written back with the model."""
        def modules(tree):  # nested modules rather than dicts, so that freezing reaches every array
            if isinstance(tree, list):
                return [modules(v) for v in tree]
            if not isinstance(tree, dict):
                return tree
            module = nn.Module()
            for key, value in tree.items():
                module[key] = modules(value)
            return module

        prefix = self.args.kept_prefix
        kept = [(k[len(prefix):], v) for k, v in weights.items() if prefix and k.startswith(prefix)]
        if kept:
            self.model[prefix.split(".")[1]] = modules(tree_unflatten(kept))

    def hidden_states(self, inputs, cache=None, packing=None):
        """The final normed hidden states of `inputs` (token ids, or rows of frozen_prefix's states); `cache`
        is a list of KVCache, one per layer, or None; `packing` says where the examples of a packed row are
        (packed_layout)."""
        h, first = self.first_states(inputs)
        return self.normed(self.run_layers(h, first, len(self.layers), cache, packing))

    def first_states(self, inputs):
        """(h, first): the hidden states of `inputs` entering the first decoder layer computed, and its number:
        the embeddings of token ids, or the states of rows of frozen_prefix."""
        if self.frozen_prefix is None:
            return self.embed(inputs), 0
        return self.frozen_prefix.states[inputs], self.frozen_prefix.layer

    def normed(self, h):
        """The final norm of the last layer's output."""
        return self.model[self.args.final_norm](h)

    def embed(self, inputs):
        h = self.model.embed_tokens(inputs)
        if self.args.scale_embeddings:
            h = h * mx.array(self.args.hidden_size**0.5, dtype=h.dtype)
        return h

    def run_layers(self, h, start, stop, cache=None, packing=None):
        """The hidden states h entering decoder layer number `start` through the layers up to `stop`."""
        offset = cache[0].offset if cache else 0
        windows = self._layer_windows[start:stop]
        packing = packing or {}
        example_rows = packing if "slots" in packing else None
        if example_rows:  # attention sees one example a row
            masks = {w: attention_mask(packing["slots"].shape[1], 0, w) for w in set(windows)}
        else:
            masks = {w: attention_mask(h.shape[1], offset, w, packing.get("examples")) for w in set(windows)}
        caches = cache[start:stop] if cache else [None] * len(windows)
        for layer, window, layer_cache in zip(self.layers[start:stop], windows, caches):
            if self.grad_checkpoint and cache is None:
                h = checkpointed(layer, masks[window], example_rows)(layer.trainable_parameters(), h)
            else:
                h = layer(h, masks[window], layer_cache, example_rows)
        return h

    def logits(self, h):
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def __call__(self, inputs, cache=None, packing=None):
        return self.logits(self.hidden_states(inputs, cache, packing))

    def make_cache(self):
        return [KVCache() for _ in self.layers]


# LoRA and DoRA


class LoRALinear(nn.Module):
    """y = linear(x) + scale * dropout(x) @ lora_a @ lora_b, over a frozen nn.Linear or nn.QuantizedLinear.
    lora_b starts at zero, so an untrained adapter changes nothing."""

    @classmethod
    def from_linear(cls, linear, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        output_dims, input_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            input_dims = input_dims * 32 // linear.bits
        lora = cls(input_dims, output_dims, rank, scale, dropout)
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
        return self.linear(x) + self.scale * self.lora_output(x)

    def lora_output(self, x):
        """dropout(x) @ lora_a @ lora_b: the adapter's output before scale."""
        return (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)

    def base_weight(self):
        """The frozen weight, dequantized if the base is quantized."""
        linear = self.linear
        if isinstance(linear, nn.QuantizedLinear):
            return dequantized_weight(linear, linear.scales.dtype)
        return linear.weight

    def merged_weight(self):
        """W + scale * (lora_a @ lora_b).T, in float32."""
        return self.base_weight().astype(mx.float32) + self.scale * (self.lora_a @ self.lora_b).T

    def to_linear(self):
        """The merged layer (merged_weight), re-quantized like the base if it was."""
        linear = self.linear
        quantized = isinstance(linear, nn.QuantizedLinear)
        weight = self.merged_weight()
        output_dims, input_dims = weight.shape
        fused = nn.Linear(input_dims, output_dims, bias="bias" in linear)
        fused.weight = weight.astype(linear.scales.dtype if quantized else linear.weight.dtype)
        if "bias" in linear:
            fused.bias = linear.bias
        if quantized:
            return QuantizedLinear.from_linear(fused, linear.group_size, linear.bits)
        return fused


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024): LoRA's merged weight W + scale * (lora_a @ lora_b).T with each output row
    rescaled to a trainable magnitude m, so that training sets a row's direction and length apart:
    y = m / ||W + ΔW||_row * (W x + scale * dropout(x) @ lora_a @ lora_b) + bias. m starts at ||W||_row, so
    an untrained adapter changes nothing. Named as mlx-lm's DoRALinear (lora_a, lora_b, m)."""

    @classmethod
    def from_linear(cls, linear, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        dora = super().from_linear(linear, rank, scale, dropout)
        dora.m = mx.linalg.norm(dora.base_weight().astype(mx.float32), axis=1)
        return dora

    def __call__(self, x):
        weight = self.base_weight()
        # The norm is a constant to the gradient, as in the paper's section 4.3 and PEFT: it saves the
        # memory of its backward pass at a negligible cost in accuracy.
        norm = mx.stop_gradient(mx.linalg.norm(super().merged_weight(), axis=1))
        # The base weight is needed whole for the norm anyway, so the product uses it dequantized.
        y = (self.m / norm).astype(x.dtype) * (x @ weight.astype(x.dtype).T + self.scale * self.lora_output(x))
        return y + self.linear.bias if "bias" in self.linear else y

    def merged_weight(self):
        """m / ||W + ΔW||_row * (W + ΔW), in float32."""
        weight = super().merged_weight()
        return (self.m / mx.linalg.norm(weight, axis=1))[:, None] * weight


def linear_layers(layer: nn.Module) -> list:
    """Module paths of the linear layers inside a decoder layer: the possible LoRA targets."""
    paths = [path for path, m in layer.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    return paths[::-1]  # named_modules() lists the last defined first


def default_lora_targets(model: Model) -> list:
    """The reference's q_proj and v_proj; Phi-3's fused qkv_proj, as its tutorial adapts."""
    if "self_attn.qkv_proj" in linear_layers(model.layers[0]):
        return ["self_attn.qkv_proj"]
    return ["self_attn.q_proj", "self_attn.v_proj"]


def target_matches(path: str, target: str) -> bool:
    """A target names a layer by its path, the end of its path (v_proj) or a pattern (experts.*.w1)."""
    return fnmatch.fnmatchcase(path, target) or fnmatch.fnmatchcase(path, "*." + target)


def last_layers(model: Model, num_layers: int) -> list:
    """The last `num_layers` decoder layers (-1: all)."""
    total = len(model.layers)
    if num_layers == -1:
        num_layers = total
    if not 0 < num_layers <= total:
        raise ValueError(f"the model has {total} layers")
    return model.layers[total - num_layers:]


def target_paths(model: Model, targets, num_layers: int) -> list:
    """The paths (model.layers.N....) of the linear layers that `targets` name (target_matches) in the last
    `num_layers` decoder layers (-1: all)."""
    choices = linear_layers(model.layers[0])
    for target in targets:
        if not any(target_matches(path, target) for path in choices):
            raise ValueError(f"{target} matches no layer; choices: {', '.join(choices)}")
    first = len(model.layers) - len(last_layers(model, num_layers))
    # in named_modules' order, the last defined first: the order the adapters draw their random starts in
    return [f"model.layers.{i}.{path}" for i in range(first, len(model.layers))
            for path in reversed(choices) if any(target_matches(path, t) for t in targets)]


def wrap_lora_layers(model: nn.Module, paths, rank: int, scale: float, dropout: float = 0.0, dora=False):
    """Wrap the linear layers at these paths in LoRALinear (DoRALinear if dora): for training new adapters
    and for loading saved ones alike."""
    modules = dict(model.named_modules())
    kind = DoRALinear if dora else LoRALinear
    model.update_modules(tree_unflatten([(p, kind.from_linear(modules[p], rank, scale, dropout)) for p in paths]))


def linear_to_lora_layers(model: Model, targets, num_layers: int, rank=8, scale=20.0, dropout=0.0, dora=False):
    """New adapters on the `targets` of the last `num_layers` decoder layers (target_paths)."""
    wrap_lora_layers(model, target_paths(model, targets, num_layers), rank, scale, dropout, dora)


def lora_layers(model: nn.Module) -> dict:
    """The LoRALinear layers (DoRALinear too) by path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


# Kernels and device-specific paths
#
# MLX's fused operations where they are fast, composed ones where a backend
# lacks them (measured in benchmarks/README.md), and the quantized layers' products.


def silu(x):
    return nn.silu(x) if mx.default_device() != mx.cpu else x / (1.0 + exp(-x))


ACTIVATIONS = {"silu": silu, "gelu": nn.gelu, "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx}


# MLX's Linux CPU wheel evaluates exp one element at a time, slowly (benchmarks/README.md, "Linux CPU"): on the
# CPU, exp is instead 2^x from a degree-6 polynomial and the exponent's bits (relative error < 4e-6), which
# mx.compile fuses with its neighbours.
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


def logsumexp(x):
    """Over the last axis."""
    if mx.default_device() != mx.cpu:
        return mx.logsumexp(x, axis=-1)
    top = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return mx.log(exp(x - top).sum(axis=-1)) + top[..., 0]


def permuted(x, index, inverse):
    """x[index], where index and inverse undo each other at every position whose gradient is not zero
    (lora.make_batch): the gradient is then gathered back through inverse rather than scattered, as MLX
    would: a scatter is the slower of the two on the CPU."""
    @mx.custom_function
    def gather(x):
        return x[index]

    @gather.vjp
    def gather_vjp(primals, cotangent, output):
        return (cotangent[inverse],)

    return gather(x)


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
        if mask.ndim == 4:  # batch x 1 x queries x keys: a group axis for the grouped heads
            mask = mask[:, :, None]
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    weights = exp(scores - mx.stop_gradient(scores.max(axis=-1, keepdims=True)))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return (weights @ v[:, :, None]).reshape(B, H, L, D)


def dequantized_weight(layer, dtype):
    return dequantized(layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits, dtype)


def dequantized(w, scales, biases, group_size, bits, dtype):
    """mx.dequantize's result, the same bits, from one fused elementwise kernel where it can: for a 4-bit
    (benchmarks/README.md: several times faster, on the CPU and CUDA)."""
    if biases is None or 32 % bits or dtype != scales.dtype:
        return mx.dequantize(w, scales, biases, group_size, bits, dtype=dtype)
    return unpacked(w, scales, biases, group_size, bits)


@mx.compile
def unpacked(w, scales, biases, group_size, bits):
    """scale * q + bias in the scales' type for each `bits`-bit q packed in w's 32-bit words, lowest bits
    first. The words are viewed as (groups, words a group, 1) so that every step broadcasts and fuses."""
    groups = scales.shape[-1]
    words = w.reshape(*w.shape[:-1], groups, group_size * bits // 32, 1)
    q = (words >> mx.arange(0, 32, bits, dtype=mx.uint32)) & ((1 << bits) - 1)
    weight = q.astype(scales.dtype) * scales[..., None, None] + biases[..., None, None]
    return weight.reshape(*w.shape[:-1], groups * group_size)


# On the CPU and CUDA, MLX's quantized matmul is slower than dequantizing the weight and a float product, for
# products over many rows (training, prompts): a quantized layer then dequantizes its weight, keeping the model
# 4-bit at rest. For a few rows (generating one token) the quantized matmul is the faster of the two. Metal
# keeps its quantized matmul: not measured against this. Figures: benchmarks/README.md, "QLoRA against LoRA".
def dequantizes(x):
    return (mx.default_device() == mx.cpu or mx.cuda.is_available()) and x.size // x.shape[-1] > 8


def dequantized_product(layer, x):
    """x @ W.T for the quantized weight W of `layer`, dequantized for the product; the backward pass
    dequantizes it again rather than keeping the float copy (the memory QLoRA saves)."""
    def weight(after):
        # made to wait for `after`: MLX would otherwise dequantize every layer's weight up front, as
        # nothing else comes before it, and hold them all
        arrays = [layer.weight, layer.scales] + ([layer.biases] if "biases" in layer else [])
        w, scales, *biases = mx.depends(arrays, [after])
        return dequantized(w, scales, biases[0] if biases else None, layer.group_size, layer.bits, after.dtype)

    @mx.custom_function
    def product(x):
        return x @ weight(x).T

    @product.vjp
    def product_vjp(primals, cotangent, output):
        return (cotangent @ weight(cotangent),)

    return product(x)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        if not dequantizes(x):
            return super().__call__(x)
        y = dequantized_product(self, x)
        return y + self.bias if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x):
        if not dequantizes(x):
            return super().as_linear(x)
        return dequantized_product(self, x)


def dequantized_copy(module: nn.Module) -> nn.Module:
    """The module, or if it holds quantized layers a copy with them dequantized (to their scales' type): for
    products over many rows at once, faster than MLX's quantized matmul (dequantizes)."""
    scales = [m.scales.dtype for _, m in module.named_modules() if isinstance(m, nn.QuantizedLinear)]
    if not scales:
        return module
    module = copy.deepcopy(module)
    dequantize(module, scales[0])
    return module


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
