"""One decoder for Llama, Mistral, Mixtral, Qwen2, Gemma, Phi-2, Phi-3, Falcon and others (and the language
models of Phi-3-vision, Mistral 3 and Gemma 3), configured from a Hugging Face config.json, and the LoRALinear
and DoRALinear wrappers. Each decoder layer's parameter names are its checkpoint's, so checkpoints load, fuse and
export without renaming; where a family puts the decoder under other prefixes, CheckpointNames maps them. In
this order: the configuration, the decoder and its parts, LoRA and DoRA, then the kernels and device-specific
paths."""
import copy
import fnmatch
import math
import re
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten


# Configuration


KEPT = "kept"  # Model's module of the weights a checkpoint has beside its decoder (CheckpointNames.kept)


def renamed(name: str, pairs) -> str:
    """`name` (a weight's, or a module's path) with the first of the (old, new) prefixes it starts with replaced."""
    dotted = name + "."
    for old, new in pairs:
        if dotted.startswith(old):
            return (new + dotted[len(old):])[:-1]
    return name


# mlx-lm's names of a mixture of experts' stacked gate, up and down layers (switch_mlp.*), whatever the checkpoint's
MLX_LM_EXPERTS = ("gate_proj", "up_proj", "down_proj")
# The arrays an expert's LoRA adapter holds as LoRALinear's (lora_a [input, rank], lora_b [rank, output]), and
# their stack as mlx-lm's LoRASwitchLinear (ExpertsLoRA: lora_a [experts, rank, input], lora_b [experts, output,
# rank]): transposed
TRANSPOSED_IN_STACK = ("lora_a", "lora_b")
# X.experts.{e}.P: expert e's layer P of a mixture of experts
EXPERT_PATH = re.compile(r"((?:.*\.)?experts)\.(\d+)\.([^.]+)")
# X.experts.gate_up_proj, X.experts.down_proj: a mixture of experts' layers stacked as transformers 5 holds them in
# memory (gate and up in one, [experts, 2 x width, hidden]), as Qwen3.5-MoE's hub checkpoints hold them
FUSED_EXPERTS = re.compile(r"((?:.*\.)?experts)\.(gate_up_proj|down_proj)")


@dataclass(frozen=True)
class CheckpointNames:
    """Where a family's checkpoint, and transformers' model in memory, put the weights this decoder holds as
    model.embed_tokens, model.layers.N..., model.norm and lm_head, where elsewhere; the one place names cross
    between them: when weights are read (utils.read_checkpoint) and written (utils.save_model, convert.py), and
    adapters named (utils.save_peft, utils.apply_adapters). Prefixes alone are renamed: a decoder layer's own
    names are its checkpoint's, but for a mixture of experts' layers (`experts`: gate, up and down, named as
    ModelArgs.expert_names), which the model holds stacked over the experts (ExpertsLinear, at experts.P) and the
    checkpoint, as adapter files, one per expert (experts.{e}.P), or quantized in mlx-lm's stack
    (switch_mlp.gate_proj, ...): stacked and unstacked convert, ours and theirs rename mlx-lm's."""
    written: tuple = ()  # (ours, the checkpoint's) prefixes, as save_pretrained writes them
    modules: Optional[tuple] = None  # (ours, transformers' module path) prefixes, PEFT's names; `written` if None
    kept: tuple = ()  # the checkpoint's prefixes of weights kept as they are, unused (an image encoder)
    experts: tuple = ()  # set by ModelArgs.names where the model has them

    def ours(self, name: str) -> str:
        """Our name for a checkpoint's weight, or for a layer named by its path in transformers' model (PEFT's
        adapters): transformers loads checkpoints in either layout. Our own names stay as they are."""
        if name.startswith(self.kept):
            return f"{KEPT}.{name}"
        name = renamed(name, [(theirs, ours) for ours, theirs in self.written + (self.modules or ())])
        stack = re.fullmatch(r"(.*\.)?switch_mlp\.([^.]+)(\..+)?", name) if self.experts else None
        if stack is None or stack[2] not in MLX_LM_EXPERTS:
            return name
        return f"{stack[1] or ''}experts.{self.experts[MLX_LM_EXPERTS.index(stack[2])]}{stack[3] or ''}"

    def theirs(self, name: str) -> str:
        """The checkpoint's name for our weight (or layer) `name`; for a stack of experts' layer, mlx-lm's (a float
        one is written per expert: unstacked)."""
        if name.startswith(f"{KEPT}."):
            return name[len(KEPT) + 1:]
        name = renamed(name, self.written)
        stack = self.stack(name)
        if stack is None:
            return name
        return f"{stack[1] or ''}switch_mlp.{MLX_LM_EXPERTS[self.experts.index(stack[2])]}{stack[3] or ''}"

    def module_path(self, path: str) -> str:
        """The path in transformers' model of our layer `path`."""
        return renamed(path, self.written if self.modules is None else self.modules)

    def stack(self, name: str):
        """The match of (the path before it, the layer, the rest) if `name` is, or is in, a stack of experts' layer
        (X.experts.P); else None."""
        stack = re.fullmatch(r"(.*\.)?experts\.([^.]+)(\..+)?", name) if self.experts else None
        return stack if stack is not None and stack[2] in self.experts else None

    def unstacked(self, name: str, value: mx.array, experts=None) -> list:
        """[(name, array)]: an array of a float stack of experts' layer (X.experts.P.leaf) as each expert's
        (X.experts.{e}.P.leaf, in an expert's own layout: TRANSPOSED_IN_STACK) of `experts` (all if None); any other
        array (a quantized stack's: mlx-lm's layout keeps it) as it is."""
        path, leaf = name.rsplit(".", 1)
        stack = self.stack(path)
        if stack is None or stack[3] or value.dtype == mx.uint32 or leaf in ("scales", "biases"):
            return [(name, value)]
        head, layer = path.rsplit(".", 1)
        return [(f"{head}.{e}.{layer}.{leaf}", value[e].T if leaf in TRANSPOSED_IN_STACK else value[e])
                for e in (range(value.shape[0]) if experts is None else experts)]

    def expert_of(self, name: str):
        """(the name in a stack, expert) of an expert's array X.experts.{e}.P.leaf: X.experts.P.leaf, e; None for
        another array."""
        path, _, leaf = name.rpartition(".")
        expert = EXPERT_PATH.fullmatch(path) if self.experts else None
        if expert is None or expert[3] not in self.experts:
            return None
        return f"{expert[1]}.{expert[3]}.{leaf}", int(expert[2])

    def fused(self, name: str):
        """Our names of the stacks of experts' layers that a checkpoint's array in transformers 5's stack holds
        (FUSED_EXPERTS: the gate's and up's, or the down's), in its order; None for another array."""
        fused = FUSED_EXPERTS.fullmatch(name) if self.experts else None
        if fused is None:
            return None
        return [f"{fused[1]}.{layer}.weight" for layer in (self.experts[:2] if fused[2] == "gate_up_proj" else
                                                              self.experts[2:])]

    def stacked(self, weights: dict, count: Optional[int] = None) -> dict:
        """`weights` (our names) with each expert's arrays of a layer (X.experts.{e}.P.leaf) stacked in one,
        X.experts.P.leaf, in the stack's layout (TRANSPOSED_IN_STACK), lazily, and transformers 5's stacks made ours
        (fused); with `count` experts, zeros in the place of those absent (adapters of some experts), else all of
        them. ValueError if their shapes differ, or an expert is missing or past `count`."""
        result, stacks = {}, {}
        for name, value in weights.items():
            expert, fused = self.expert_of(name), self.fused(name)
            if fused is not None:  # gate and up split apart
                result.update(zip(fused, mx.split(value, len(fused), axis=-2)))
            elif expert is None:
                result[name] = value
            else:
                transposed = name.rsplit(".", 1)[-1] in TRANSPOSED_IN_STACK
                stacks.setdefault(expert[0], {})[expert[1]] = value.T if transposed else value
        for name, pieces in stacks.items():
            experts, layer, leaf = name.rsplit(".", 2)
            shapes = sorted({tuple(v.shape) for v in pieces.values()})
            if len(shapes) > 1:
                raise ValueError(f"{experts}.*.{layer}.{leaf}: the experts' shapes differ "
                                 f"({', '.join(map(str, shapes))})")
            if count is not None and max(pieces) >= count:
                raise ValueError(f"{experts}.{max(pieces)}.{layer}.{leaf}: the model has {count} experts")
            if count is None:
                missing = sorted(set(range(max(pieces))) - set(pieces))
                if missing:
                    raise ValueError(f"{experts}.{missing[0]}.{layer}.{leaf} missing")
                result[name] = mx.stack([pieces[e] for e in sorted(pieces)])
            else:
                zero = mx.zeros(shapes[0], next(iter(pieces.values())).dtype)
                result[name] = mx.stack([pieces.get(e, zero) for e in range(count)])
        return result


@dataclass(frozen=True)
class Family:
    """What sets one model_type apart from Llama, in one place: `switches`, the config values it has unless
    config.json says otherwise (ModelArgs fields that config.json never holds, and transformers' defaults for
    the family where they differ from Llama's); `fix`, which reads the family's own config fields into
    ModelArgs' as transformers reads them (and raises ValueError naming a field whose setting is not
    implemented); its default LoRA targets; the layers convert -q keeps in float (path suffixes); the models
    it is; the decoder layer class where its forward pass is its own; the checkpoint's weights that the
    model does not have, which transformers drops on loading too (dropped(config, name), e.g. multi-token
    prediction layers); its checkpoint's names; and the Model subclass where the model around the layers is its
    own. A vision-language model trained on text (text_types) is its language model, text_config's family
    (language_model), with its own names and fix (run after the language model's)."""
    models: str
    switches: dict = field(default_factory=dict)
    fix: Optional[Callable[[dict], None]] = None
    lora_targets: tuple = ("self_attn.q_proj", "self_attn.v_proj")
    unquantized: tuple = ()
    layer: Optional[str] = None  # a class of this module; DecoderLayer if None
    dropped: Optional[Callable[[dict, str], bool]] = None
    names: CheckpointNames = CheckpointNames()
    text_types: tuple = ()  # the model_types text_config may have, the first its default: a vision-language model
    model: Optional[str] = None  # a class of this module; Model if None
    # Whether the hidden states entering a layer are all that the layers from it on read, so that a pass may
    # go a layer at a time over many batches, keeping only those states in between (lora.py's frozen-layer
    # cache and DPO reference pass). Not so where layers read more (Gemma 4: per-layer embeddings, shared K/V).
    layer_at_a_time: bool = True
    # Whether some layers carry a state along the row (a scan, a short convolution) rather than attend: a packed
    # row's examples then each take a row of their own (ModelArgs.packs_by_example), for each state to start
    # anew at its example's first token; in generation such a layer keeps its state in a StateCache.
    carries_state: bool = False
    # layers (path suffixes) whose adapters PEFT refuses to load on this model_type: fuse.py --export-peft too
    peft_refused: tuple = ()


def sliding_where(slides):
    """Qwen's and SmolLM3's switch: a window only if use_sliding_window; then, where layer_types is absent, the
    layers i for which slides(config, i) slide."""
    def fix(config):
        if not config.get("use_sliding_window"):
            config["sliding_window"] = None
        elif config.get("layer_types") is None:
            config["layer_types"] = ["sliding_attention" if slides(config, i) else "full_attention"
                                     for i in range(config.get("num_hidden_layers", 0))]
    return fix


# Qwen2's and Qwen3's: the layers from max_window_layers on
sliding_from_max_window_layers = sliding_where(lambda config, i: i >= config.get("max_window_layers", 0))


def sliding_every(period: int, key="sliding_window_pattern"):
    """layer_types where absent (transformers 4's configs): every `period`-th layer attends to the whole
    sequence, the others slide (config[key] gives the period where present)."""
    def fix(config):
        if config.get("layer_types") is None:
            n = config.get(key) or period
            config["layer_types"] = ["full_attention" if (i + 1) % n == 0 else "sliding_attention"
                                     for i in range(config.get("num_hidden_layers", 0))]
    return fix


def gemma_fix(config: dict):
    # transformers reads hidden_activation (else tanh-gelu), not hidden_act; embeddings times sqrt(hidden_size)
    config["hidden_act"] = config.get("hidden_activation") or "gelu_pytorch_tanh"
    config["embedding_scale"] = config.get("hidden_size", 0) ** 0.5
    if config.get("query_pre_attn_scalar"):
        config["attention_scale"] = config["query_pre_attn_scalar"] ** -0.5
    if config.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention is not supported (causal language models only)")


def gemma3_fix(config: dict):
    gemma_fix(config)
    sliding_every(6)(config)
    config["attn_logit_softcapping"] = None  # Gemma 3's attention reads no soft cap, whatever the config says
    # transformers 4 wrote the sliding layers' rope base apart, and no scaling for them
    if not nested_rope(config):
        rope = flat_rope(config)
        local = {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", 10000.0)}
        config["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}


def rope_unless_given(config: dict, rope: dict):
    """`rope` where the config gives no rope parameters or scaling: some families' transformers read a
    top-level rope_theta alone as no rope at all, and install their own."""
    if not (config.get("rope_parameters") or config.get("rope_scaling")):
        config["rope_parameters"] = rope


def rope_layers_fix(config: dict):
    """no_rope_layers: 1 where a layer uses rope (by default all but every no_rope_layer_interval-th)."""
    n = config.get("num_hidden_layers", 0)
    uses_rope = config.get("no_rope_layers") or [
        int((i + 1) % config.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
    config["rope_layers"] = [bool(x) for x in uses_rope[:n]]


def smollm3_fix(config: dict):
    """rope_layers_fix; the layers without rope slide, if use_sliding_window."""
    rope_layers_fix(config)
    sliding_where(lambda config, i: not config["rope_layers"][i])(config)


def olmo3_fix(config: dict):
    sliding_every(4)(config)
    # transformers 4's layout: its rope is the full layers'; the sliding layers keep OLMo 3's default
    if "rope_parameters" not in config:
        full = flat_rope(config)
        config["rope_parameters"] = {"full_attention": full,
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0}}
    elif not nested_rope(config):  # transformers 5 reads only rope parameters nested by layer type here
        raise ValueError("rope_parameters is not nested by layer type (full_attention, sliding_attention), "
                         "which OLMo 3 requires")


def granite_fix(config: dict):
    for ours, theirs in (("embedding_scale", "embedding_multiplier"), ("residual_scale", "residual_multiplier"),
                         ("attention_scale", "attention_multiplier")):
        if config.get(theirs) is not None:
            config[ours] = config[theirs]
    if config.get("logits_scaling"):
        config["logits_scale"] = 1 / config["logits_scaling"]


def cohere_fix(config: dict):
    config["logits_scale"] = config.get("logit_scale")
    if config.get("use_qk_norm"):
        config["qk_norm"] = "each_head"


def cohere2_fix(config: dict):
    """Only the sliding layers use rope, and none if sliding_window is null: transformers rotates q and k in
    the layers whose window is set."""
    config["logits_scale"] = config.get("logit_scale")
    sliding_every(4)(config)
    config["rope_layers"] = [kind == "sliding_attention" and config.get("sliding_window") is not None
                             for kind in config["layer_types"]]


def starcoder2_fix(config: dict):
    config["layer_norm_eps"] = config.get("norm_epsilon")
    config["attention_bias"] = config["mlp_bias"] = config.get("use_bias")


def glm_fix(config: dict):
    # GLM's attention_bias is on q, k and v, never on the output projection
    config["qkv_bias"], config["attention_bias"] = config.get("attention_bias"), False


def exaone4_fix(config: dict):
    """Where the model has a sliding window, the layers that slide use rope and the others none; without
    one, every layer attends to the whole sequence, with rope."""
    if config.get("sliding_window") is None:
        return
    if config.get("layer_types") is None:
        if not isinstance(config.get("sliding_window_pattern"), int):
            raise ValueError(f"sliding_window_pattern is {config.get('sliding_window_pattern')!r} without layer_types, "
                             f"which transformers derives from a number (every n-th layer global) alone")
        sliding_every(4)(config)
    config["rope_layers"] = [kind == "sliding_attention" for kind in config["layer_types"]]


def hunyuan_fix(config: dict):
    # a dynamic rope given an alpha is NTK scaling by that alpha at every length, in transformers' reading
    rope = flat_rope(config)
    if rope["rope_type"] == "dynamic" and rope.get("alpha"):
        config["rope_parameters"] = dict(rope, rope_type="ntk_alpha")
    config["mlp_bias"] = False  # its MLP has none, whatever the config says


def seed_oss_fix(config: dict):
    """attention_bias is q, k and v's biases (our qkv_bias); attention_out_bias, read as it is, o_proj's.
    Its attention_dropout and residual_dropout act in transformers' training alone, and are not implemented:
    the model's function, what evaluation and the fused model compute, is without them; and training here
    updates adapters (or a few layers) on a frozen base, whose pretraining regularisation need not carry over
    (--lora-dropout regularises the adapters)."""
    config["qkv_bias"], config["attention_bias"] = config.get("attention_bias"), False


def ernie4_5_fix(config: dict):
    config["attention_bias"] = config["mlp_bias"] = bool(config.get("use_bias"))


def apertus_fix(config: dict):
    # checkpoints' qk_norm and mlp_bias fields are not transformers': its queries and keys are always normed
    config.update(qk_norm="head", mlp_bias=False)
    rope_unless_given(config, {"rope_type": "llama3", "rope_theta": 12e6, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def internlm3_fix(config: dict):
    """transformers reads InternLM3 as Llama: qkv_bias as attention_bias (q, k, v and o_proj), bias as
    mlp_bias, which must then be alike."""
    for ours, theirs in (("attention_bias", "qkv_bias"), ("mlp_bias", "bias")):
        if theirs in config:
            config[ours] = config.pop(theirs)
    if bool(config.get("attention_bias")) != bool(config.get("mlp_bias")):
        raise ValueError("qkv_bias (attention_bias) differs from bias (mlp_bias), which InternLM3 read as Llama "
                         "cannot hold")


def ministral3_fix(config: dict):
    """Every layer slides if sliding_window is set (layer_types is not read); rope's llama_4_scaling_beta and
    original_max_position_embeddings scale the queries (query_scaling)."""
    config["layer_types"] = None
    rope_unless_given(config, {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1})
    rope = flat_rope(config)
    if rope.get("llama_4_scaling_beta"):
        if not rope.get("original_max_position_embeddings"):
            raise ValueError("rope_parameters has llama_4_scaling_beta without original_max_position_embeddings")
        config["query_scaling"] = (rope["llama_4_scaling_beta"], rope["original_max_position_embeddings"], 0)


def experts_from(config: dict, count: str, top_k: Optional[str] = None):
    """The family's names for the number of experts and of experts per token, read into ModelArgs' (a config.json
    of transformers 5 may hold ours instead: then it stands)."""
    if config.get(count) is not None:
        config["num_local_experts"] = config[count]
    if top_k is not None and config.get(top_k) is not None:
        config["num_experts_per_tok"] = config[top_k]


def moe_every_step(config: dict):
    """Qwen's MoE layers: every decoder_sparse_step-th, except those in mlp_only_layers (and none without experts)."""
    only, step = config.get("mlp_only_layers") or [], config.get("decoder_sparse_step") or 1
    config["moe_layers"] = [i not in only and config["num_local_experts"] > 0 and (i + 1) % step == 0
                            for i in range(config.get("num_hidden_layers", 0))]


def qwen2_moe_fix(config: dict):
    experts_from(config, "num_experts")
    moe_every_step(config)
    # unlike Qwen2, the layers below max_window_layers slide, every other one
    sliding_where(lambda config, i: (i + 1) % 2 and i < config.get("max_window_layers", 0))(config)


def qwen3_moe_fix(config: dict):
    experts_from(config, "num_experts")
    moe_every_step(config)
    # a window, if any, for every layer: transformers reads neither max_window_layers nor layer_types here
    config["layer_types"] = None
    if not config.get("use_sliding_window"):
        config["sliding_window"] = None


def phimoe_fix(config: dict):
    config["layer_norm_eps"] = config.get("rms_norm_eps")  # its LayerNorms take the RMSNorm's name for eps
    # transformers reads the original context from the rope parameters alone (else max_position_embeddings)
    config.pop("original_max_position_embeddings", None)
    rope = flat_rope(config)
    if rope["rope_type"] not in ("default", "longrope"):
        raise ValueError(f"rope_type {rope['rope_type']!r} is not supported for phimoe (default, longrope)")
    for key in ("short_mscale", "long_mscale") if rope["rope_type"] == "longrope" else ():
        if not isinstance(rope.get(key), (int, float)):
            raise ValueError(f"rope_parameters' {key} is {rope.get(key)!r}, expected a number (phimoe's longrope)")


def grouped_experts(config: dict):
    """GLM-4.5's and DeepSeek's experts: n_routed_experts in the layers from first_k_dense_replace on, beside
    n_shared_experts' MLP, chosen from the topk_group best of n_group groups."""
    experts_from(config, "n_routed_experts")
    n, shared = config.get("num_hidden_layers", 0), config.get("n_shared_experts") or 0
    config["moe_layers"] = [i >= (config.get("first_k_dense_replace") or 0) for i in range(n)]
    if shared:  # one MLP as large as that many experts
        config["shared_expert"] = "shared_experts"
        config["shared_expert_intermediate_size"] = config.get("moe_intermediate_size", 0) * shared
    experts, groups, kept = config["num_local_experts"], config.get("n_group") or 1, config.get("topk_group") or 1
    if groups > 1 and (experts % groups or experts // groups < 2 or kept > groups):
        raise ValueError(f"n_group {groups} and topk_group {kept}: expected groups of two experts or more, out of "
                         f"n_routed_experts {experts}, and no more groups kept than there are")
    if not isinstance(config.get("num_experts_per_tok"), int):
        raise ValueError(f"num_experts_per_tok is {config.get('num_experts_per_tok')!r}, expected a number")
    if config["num_experts_per_tok"] > experts // groups * kept:
        raise ValueError(f"num_experts_per_tok {config['num_experts_per_tok']} is more than topk_group {kept} "
                         f"groups hold")


def glm4_moe_fix(config: dict):
    grouped_experts(config)
    # the attention's bias is on q, k and v only
    config["qkv_bias"], config["attention_bias"] = config.get("attention_bias"), False
    if config.get("use_qk_norm"):
        config["qk_norm"] = "head"


def deepseek_fix(config: dict):
    """DeepSeek V2's and V3's latent attention (LatentAttention) and experts (grouped_experts), as transformers
    reads them."""
    heads = config.get("num_attention_heads")
    if config.get("num_key_value_heads") not in (None, heads):
        raise ValueError(f"num_key_value_heads {config['num_key_value_heads']}: latent attention has a key and value "
                         f"for each of the num_attention_heads ({heads}) (transformers cannot run it either)")
    if flat_rope(config)["partial_rotary_factor"] != 1.0:
        raise ValueError("partial_rotary_factor is not supported (latent attention rotates qk_rope_head_dim "
                         "features)")
    if (config.get("moe_layer_freq") or 1) != 1:
        raise ValueError(f"moe_layer_freq {config['moe_layer_freq']} is not supported (transformers has experts in "
                         f"every layer from first_k_dense_replace on)")
    grouped_experts(config)


def deepseek_v2_fix(config: dict):
    """V2's router: the softmax's top experts, their probabilities unnormalized (transformers reads no
    norm_topk_prob); by group_limited_greedy, from the topk_group groups of the highest best probabilities."""
    method = config.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"topk_method {method!r} is not supported (deepseek_v2: greedy, group_limited_greedy)")
    if config.get("scoring_func", "softmax") != "softmax":
        raise ValueError(f"scoring_func {config['scoring_func']!r} is not supported (deepseek_v2: softmax)")
    if config.get("norm_topk_prob"):
        raise ValueError("norm_topk_prob true is not supported (transformers' deepseek_v2 never normalizes)")
    if method == "greedy":
        config["n_group"] = config["topk_group"] = None
    config["group_score_top"] = 1
    deepseek_fix(config)


def deepseek_v3_fix(config: dict):
    """V3's router is GLM-4.5's: sigmoids, a bias to choose by, groups scored by their two best."""
    if (config.get("quantization_config") or {}).get("quant_method") == "fp8":
        raise ValueError("quantization_config: FP8 weights (the Hub's DeepSeek-V3 files) are not supported; use a "
                         "copy saved in bf16")
    for key, kind in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if config.get(key, kind) != kind:
            raise ValueError(f"{key} {config[key]!r} is not supported (deepseek_v3: {kind})")
    config["rope_interleaved"] = bool(config.get("rope_interleave"))
    deepseek_fix(config)


def sarvam_mla_fix(config: dict):
    """Sarvam's first configs (for its own code) as transformers reads them: num_experts and num_shared_experts for
    DeepSeek's names, and yarn called deepseek_yarn."""
    for old, new in (("num_experts", "n_routed_experts"), ("num_shared_experts", "n_shared_experts")):
        if config.get(old) is not None:
            config[new] = config[old]
    rope = config.get("rope_scaling")
    if isinstance(rope, dict) and "deepseek_yarn" in (rope.get("type"), rope.get("rope_type")):
        config["rope_scaling"] = {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": "yarn"}
    deepseek_v3_fix(config)


def ernie4_5_moe_fix(config: dict):
    experts_from(config, "moe_num_experts", "moe_k")
    config["norm_topk_prob"] = True
    config["attention_bias"] = config["mlp_bias"] = config["lm_head_bias"] = config.get("use_bias")
    n, shared = config.get("num_hidden_layers", 0), config.get("moe_num_shared_experts") or 0
    last = config.get("moe_layer_end_index", -1)
    last = n - 1 if last == -1 else last
    config["moe_layers"] = [(i + 1) % config.get("moe_layer_interval", 1) == 0
                            and config.get("moe_layer_start_index", 0) <= i <= last for i in range(n)]
    if shared:  # one MLP as large as that many experts
        config["shared_expert"] = "shared_experts"
        config["shared_expert_intermediate_size"] = config.get("moe_intermediate_size", 0) * shared
    # the chosen experts' weights sum to at least num_experts_per_tok / experts: moe_norm_min below that never acts
    floor = config.get("moe_norm_min") or 0
    if floor > config["num_experts_per_tok"] / max(config["num_local_experts"], 1):
        raise ValueError(f"moe_norm_min {floor} is not supported (above moe_k / moe_num_experts)")


def hunyuan_v1_moe_fix(config: dict):
    top_k = config.get("moe_topk")
    if isinstance(top_k, list):
        if len(set(top_k)) > 1:
            raise ValueError("moe_topk differs between layers: not supported")
        config["moe_topk"] = top_k[0]
    experts_from(config, "num_experts", "moe_topk")
    config["norm_topk_prob"] = True
    # transformers sizes the experts and the shared MLP by intermediate_size, whatever these say
    config["moe_intermediate_size"] = None
    config["shared_expert_intermediate_size"] = config.get("intermediate_size")
    hunyuan_fix(config)


def gated_delta_fix(config: dict):
    """Qwen3-Next's and Qwen3.5's layers: linear attention (GatedDeltaNet) or attention with an output gate, by
    layer_types, else every full_attention_interval-th layer attention; as many value heads for each key head."""
    if config.get("layer_types") is None:
        interval = config.get("full_attention_interval") or 4
        config["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                 for i in range(config.get("num_hidden_layers", 0))]
    kinds = set(config["layer_types"]) if isinstance(config["layer_types"], list) else set()
    unknown = sorted(map(str, kinds - {"linear_attention", "full_attention"}))
    if unknown:
        raise ValueError(f"layer_types has {', '.join(unknown)}: Qwen3-Next's and Qwen3.5's layers are "
                         f"linear_attention or full_attention")
    keys, values = config.get("linear_num_key_heads"), config.get("linear_num_value_heads")
    if isinstance(keys, int) and isinstance(values, int) and keys > 0 and values % keys:
        raise ValueError(f"linear_num_value_heads {values} is not a multiple of linear_num_key_heads {keys}")
    if config.get("hidden_act") in ACTIVATION_MODULES:  # the convolution's too, which holds no parameters for it
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported for linear attention "
                         f"({', '.join(ACTIVATIONS)})")
    config["sliding_window"] = None  # no layer slides


def qwen3_next_fix(config: dict):
    experts_from(config, "num_experts")
    moe_every_step(config)
    gated_delta_fix(config)


def qwen3_5_moe_fix(config: dict):
    experts_from(config, "num_experts")
    config["moe_layers"], config["norm_topk_prob"] = None, True  # every layer's; transformers always normalizes
    # no layer has a dense MLP, so its config has no size for one (the hub's Qwen3.5-35B-A3B's neither)
    config.setdefault("intermediate_size", config.get("moe_intermediate_size"))
    gated_delta_fix(config)


def mtp_weight(config: dict, name: str) -> bool:
    """A weight of the multi-token prediction layers that Qwen3-Next and Qwen3.5 checkpoints hold (mtp.*)."""
    return name.startswith("mtp.")


def mtp_layer(config: dict, name: str) -> bool:
    """A weight of the multi-token prediction layers that GLM-4.5 checkpoints hold after the decoder layers."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return match is not None and int(match[1]) >= config["num_hidden_layers"]


def falcon_fix(config: dict):
    """Falcon's variants as transformers reads them. The new decoder architecture (40B, 180B, Falcon2) groups q, k
    and v by key-value head (num_kv_heads) and runs attention and the MLP side by side, on ln_attn's and ln_mlp's
    outputs (num_ln_in_parallel_attn 2, its default) or on input_layernorm's; the old one has one key-value head
    (multi_query: 7B) or one per head with q, k and v grouped by head (RW), and runs attention and the MLP side
    by side (parallel_attn) or in turn; alibi replaces rope (RW)."""
    if config.get("n_embed") is not None:  # the first releases' name
        config["hidden_size"] = config["n_embed"]
    hidden, heads = config.get("hidden_size", 0), config.get("num_attention_heads") or 1
    new, parallel = config.get("new_decoder_architecture"), config.get("parallel_attn")
    split_norms = (config.get("num_ln_in_parallel_attn") or (2 if new else 1)) == 2
    if new and not parallel:
        raise ValueError("new_decoder_architecture with parallel_attn false is not supported (transformers "
                         "cannot run it either)")
    if parallel and split_norms and not new:
        raise ValueError("num_ln_in_parallel_attn 2 without new_decoder_architecture is not supported "
                         "(transformers cannot run it either)")
    if not parallel:
        config["block_norms"] = ("input_layernorm", None, "post_attention_layernorm", None)
    elif split_norms:
        config["block_norms"] = ("ln_attn", None, "ln_mlp", None)
    config["parallel"] = bool(parallel)
    config["num_key_value_heads"] = (config.get("num_kv_heads") or heads if new else
                                     1 if config.get("multi_query") else heads)
    config["qkv_grouped"] = bool(new or not config.get("multi_query"))
    config["head_dim"] = hidden // heads
    config["intermediate_size"] = config.get("ffn_hidden_size") or 4 * hidden
    config["hidden_act"] = config.get("activation") or "gelu"
    config["layer_norm_eps"] = config.get("layer_norm_epsilon") or 1e-5
    config["attention_bias"] = config["mlp_bias"] = bool(config.get("bias"))
    if config.get("alibi"):
        config["rope_layers"] = [False] * config.get("num_hidden_layers", 0)


LFM2_LAYER_TYPES = ("conv", "full_attention")


def positive_number(config: dict, key: str, integer=True):
    """config[key], if a positive integer (or, not integer, a positive finite number); else ValueError naming it."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{key} is {value!r}, expected a positive {'integer' if integer else 'number'}")
    return value


def lfm2_names(config: dict):
    """LFM2's and LFM2-MoE's names: norm_eps, tie_embedding (the hub's, which wins), layer_types (conv or
    full_attention, which transformers' masks alone know)."""
    config["rms_norm_eps"] = config.get("norm_eps")
    if "tie_embedding" in config:
        config["tie_word_embeddings"] = config["tie_embedding"]
    kinds = config.get("layer_types")
    unknown = sorted({str(kind) for kind in kinds} - set(LFM2_LAYER_TYPES)) if isinstance(kinds, list) else None
    if kinds is None or unknown:
        raise ValueError(f"layer_types {'is ' + repr(kinds) if kinds else 'missing'}, expected a list of "
                         f"{' or '.join(LFM2_LAYER_TYPES)}")


def lfm2_fix(config: dict):
    """LFM2's config as transformers reads it: the hub's block_ff_dim (which wins over intermediate_size), the
    layers' types from full_attn_idxs where layer_types is absent (every layer attends if both are), and, with
    block_auto_adjust_ff_dim, the MLP's width two thirds of that, times block_ffn_dim_multiplier and rounded up
    to block_multiple_of if the multiplier is set."""
    if "block_ff_dim" in config:
        config["intermediate_size"] = config["block_ff_dim"]
    if config.get("layer_types") is None:
        layers = range(config.get("num_hidden_layers") or 0)
        attending = config.get("full_attn_idxs")
        if attending is not None and not isinstance(attending, list):
            raise ValueError(f"full_attn_idxs is {attending!r}, expected a list of layer numbers")
        config["layer_types"] = ["full_attention" if attending is None or i in attending else "conv" for i in layers]
    lfm2_names(config)
    if config.get("block_auto_adjust_ff_dim"):
        width = int(2 * positive_number(config, "intermediate_size") / 3)
        if config.get("block_ffn_dim_multiplier") is not None:
            multiple = positive_number(config, "block_multiple_of")
            width = int(positive_number(config, "block_ffn_dim_multiplier", integer=False) * width)
            width = multiple * -(-width // multiple)
        config["intermediate_size"] = width


def lfm2_moe_fix(config: dict):
    """LFM2-MoE's config as transformers reads it: LFM2's names (lfm2_names; intermediate_size is the dense layers'
    MLP's as it is); the mixture of experts in the layers from num_dense_layers on, chosen by the sigmoids of the
    router's scores plus expert_bias if use_expert_bias."""
    lfm2_names(config)
    experts_from(config, "num_experts")
    dense = config.get("num_dense_layers")
    if not isinstance(dense, int) or isinstance(dense, bool):
        raise ValueError(f"num_dense_layers is {dense!r}, expected an integer")
    config["moe_layers"] = [i >= dense for i in range(config.get("num_hidden_layers", 0))]
    if config.get("use_expert_bias"):
        config["router_bias"] = ("expert_bias", 1)
    if config["num_experts_per_tok"] > config["num_local_experts"]:
        raise ValueError(f"num_experts_per_tok {config['num_experts_per_tok']} is more than num_experts "
                         f"{config['num_local_experts']}")
def falcon_h1_fix(config: dict):
    """Falcon-H1's muP multipliers as transformers applies them: embedding_multiplier to the embeddings,
    lm_head_multiplier to the logits; the decoder layer's (FalconH1DecoderLayer) read as they are, mlp_multipliers
    (the gate's, the output's) and ssm_multipliers (of the mixer's in_proj's parts: gate, x, B, C, dt) as many as
    transformers splits them into."""
    config["embedding_scale"] = config.get("embedding_multiplier")
    config["logits_scale"] = config.get("lm_head_multiplier")
    for key, parts in (("mlp_multipliers", 2), ("ssm_multipliers", 5)):
        value = config.get(key)
        if value is None:
            config[key] = [1.0] * parts
        elif not (isinstance(value, list) and len(value) == parts
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"{key} is {value!r}, expected a list of {parts} numbers")


def language_model(config: dict, wrapper: Family) -> dict:
    """The config of a vision-language model's language model, as transformers reads it: text_config, its
    model_type wrapper.text_types' first if absent, with the output layer tied to the embedding as the top level
    says (utils.model_skeleton unties it where the checkpoint has an output layer of its own, as transformers
    does), and `wrapper` naming the outer model_type (for its checkpoint's names)."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"text_config is {text!r}, expected an object")
    text = {"model_type": wrapper.text_types[0], **text, "wrapper": config["model_type"],
            "tie_word_embeddings": config.get("tie_word_embeddings", True)}
    supported = [t for t in wrapper.text_types if t in FAMILIES]
    if text["model_type"] not in supported:
        raise ValueError(f"text_config's model_type {text['model_type']!r} is not supported ({', '.join(supported)})")
    return text


GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


def gpt_oss_fix(config: dict):
    if (config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        raise ValueError("quantization_config: MXFP4 experts (the Hub's gpt-oss files) are not supported; use a "
                         "copy saved in bf16 (transformers: Mxfp4Config(dequantize=True))")
    sliding_every(2)(config)
    rope_unless_given(config, {**GPT_OSS_YARN, "rope_theta": config["rope_theta"]})


def llama4_fix(config: dict):
    """Llama 4's layers as transformers derives them: rope_layers_fix; the mixture of experts in the layers
    moe_layers lists (by default every interleave_moe_layer_step-th); chunked attention in the layers with
    rope, if attention_chunk_size."""
    rope_layers_fix(config)
    n = config.get("num_hidden_layers", 0)
    moe = config.get("moe_layers")
    if moe is None:
        step = config.get("interleave_moe_layer_step", 1)
        moe = range(step - 1, n, step)
    config["moe_layers"] = [i in set(moe) for i in range(n)]
    if config.get("layer_types") is None:
        chunked = config.get("attention_chunk_size") is not None
        config["layer_types"] = ["chunked_attention" if rope and chunked else "full_attention"
                                 for rope in config["rope_layers"]]
    config["qk_l2_norm"] = bool(config.get("use_qk_norm"))
    # the Hub's configs give a number (4), which transformers' strict config refuses; any true value turns it on
    config["attn_temperature_tuning"] = bool(config.get("attn_temperature_tuning"))
    if config["attn_temperature_tuning"]:  # by the position counted from 1
        config["query_scaling"] = (config["attn_scale"], config["floor_scale"], 1)


GEMMA4_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}
KV_SIZES = ("head_dim", "num_key_value_heads")


def gemma4_fix(config: dict):
    """Gemma 4's config as transformers 5 reads it (it has no transformers 4 layout): the last layer attends to
    the whole sequence whatever layer_types says; rope only from rope_parameters nested by layer type; the full
    layers' head size and K/V heads from per_layer_config, else (the hub's configs) from global_head_dim and,
    with attention_k_eq_v, num_global_key_value_heads; num_kv_shared_layers as each layer's part in the
    sharing (kv_sharing), use_double_wide_mlp as each layer's MLP width; enable_moe_block's experts."""
    if config.get("use_bidirectional_attention") == "vision":  # image tokens alone attend both ways
        config["use_bidirectional_attention"] = None
    gemma_fix(config)
    if config.get("enable_moe_block"):  # beside the MLP, in every layer
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if not config.get(key):
                raise ValueError(f"enable_moe_block needs {key}")
        config["num_local_experts"], config["num_experts_per_tok"] = config["num_experts"], config["top_k_experts"]
    else:
        config["num_local_experts"] = 0
    n = config.get("num_hidden_layers", 0)
    sliding_every(6)(config)
    types = config["layer_types"] = list(config["layer_types"])
    if types:
        types[-1] = "full_attention"
    for key in ("rope_theta", "rope_scaling", "partial_rotary_factor", "rope_local_base_freq"):
        config.pop(key, None)  # transformers reads none of them here
    if config.get("rope_parameters") is None:
        config["rope_parameters"] = GEMMA4_ROPE
    elif not nested_rope(config):
        raise ValueError("rope_parameters is not nested by layer type (full_attention, sliding_attention), "
                         "which Gemma 4 requires")
    # Gemma 4's default rope turns the whole head, whatever partial_rotary_factor says
    config["rope_parameters"] = {kind: {k: v for k, v in rope.items() if k != "partial_rotary_factor"}
                                 if rope.get("rope_type", "default") == "default" else rope
                                 for kind, rope in config["rope_parameters"].items()}

    if "per_layer_config" in config:
        sizes = {int(i): layer for i, layer in (config["per_layer_config"] or {}).items()}
        unknown = sorted({key for layer in sizes.values() for key in layer} - set(KV_SIZES))
        if unknown:
            raise ValueError(f"per_layer_config sets {', '.join(unknown)}, which is not supported")
    else:
        full = {"head_dim": config.get("global_head_dim") or 512}
        if config.get("attention_k_eq_v") and config.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = config["num_global_key_value_heads"]
        sizes = {i: full for i, kind in enumerate(types) if kind == "full_attention"}
    config["layer_head_dims"], config["layer_kv_heads"] = (
        [sizes.get(i, {}).get(key) or config.get(key) for i in range(n)] for key in KV_SIZES)

    shared = config.get("num_kv_shared_layers") or 0
    first = n - shared
    if shared and first <= 0:
        raise ValueError(f"num_kv_shared_layers {shared}: leaves no layer of its own K/V among {n}")
    modes = [None] * first + ["reuse"] * shared
    for kind in set(types[first:]):  # the last layer of each type before the sharing ones serves them
        producers = [i for i in range(first) if types[i] == kind]
        if not producers:
            raise ValueError(f"num_kv_shared_layers {shared}: no layer before the shared ones is {kind}")
        modes[producers[-1]] = "store"
    config["kv_sharing"] = modes if shared else None
    wide = 2 if config.get("use_double_wide_mlp") else 1
    config["layer_intermediate_sizes"] = [config.get("intermediate_size", 0) * (wide if mode == "reuse" else 1)
                                          for mode in modes]
    if not config.get("hidden_size_per_layer_input"):  # 0 turns the per-layer embeddings off
        config["hidden_size_per_layer_input"] = None


def gemma4_shared_kv(config: dict, name: str) -> bool:
    """A K/V projection or norm of a layer that reuses another's K/V, which hub checkpoints may hold (and
    transformers drops)."""
    text = config.get("text_config") or config
    match = re.match(r"model\.(language_model\.)?layers\.(\d+)\.self_attn\.[kv]_(proj|norm)\.", name)
    return match is not None and int(match[2]) >= text["num_hidden_layers"] - (text.get("num_kv_shared_layers") or 0)


# transformers' defaults for the Mamba-2 layers of Granite 4 and Falcon-H1
MAMBA2 = {"mamba_n_heads": 128, "mamba_d_head": "auto", "mamba_d_state": 256, "mamba_expand": 2}
# how transformers writes the numbers that JSON has no literal for: {"__float__": "Infinity"}
SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def mamba_fix(config: dict):
    """The Mamba-2 layers' settings as transformers derives them: mamba_d_head "auto" is their inner width
    (mamba_d_ssm, else mamba_expand * hidden_size) over mamba_n_heads, and must make it whole; time_step_limit as
    [low, high], high None for no bound (transformers writes infinity as {"__float__": "Infinity"}); hidden_act one
    without parameters of its own."""
    numbers = {key: config.get(key) for key in ("mamba_n_heads", "mamba_expand", "hidden_size")}
    for key, n in numbers.items():
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"{key} is {n!r}, expected a positive integer")
    heads, groups = numbers["mamba_n_heads"], config.get("mamba_n_groups", 1)
    inner = config.get("mamba_d_ssm") or numbers["mamba_expand"] * numbers["hidden_size"]
    head = config.get("mamba_d_head", "auto")
    if head == "auto":
        head = config["mamba_d_head"] = inner // heads
    if not isinstance(head, int) or head * heads != inner:
        raise ValueError(f"mamba_d_head is {head!r}: mamba_n_heads {heads} heads of it must make the Mamba layers' "
                         f"width, {inner}")
    if isinstance(groups, int) and groups > 0 and heads % groups:
        raise ValueError(f"mamba_n_groups is {groups}: it must divide mamba_n_heads {heads}")
    limit = config.get("time_step_limit")
    if limit is not None:
        bounds = [SPECIAL_FLOATS.get(v["__float__"], v) if isinstance(v, dict) and isinstance(v.get("__float__"), str)
                  else v for v in limit] if isinstance(limit, list) else []
        if (len(bounds) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds)
                or not 0 <= bounds[0] <= bounds[1]):
            raise ValueError(f"time_step_limit is {limit!r}, expected [low, high] with 0 <= low <= high")
        config["time_step_limit"] = [bounds[0], None if bounds[1] == math.inf else bounds[1]]
    act = config.get("hidden_act")
    if isinstance(act, str) and act in ACTIVATION_MODULES:  # also the convolution's, which has no parameters
        raise ValueError(f"hidden_act {act!r} is not supported with Mamba-2 layers ({', '.join(ACTIVATIONS)})")


# transformers 4's names of Granite 4's layer types, which the hub's configs give
GRANITE4_LAYER_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}


def granitemoehybrid_fix(config: dict):
    """Granite 4 as transformers reads it: Granite's multipliers; layer_types' Mamba-2 layers (linear_attention, or
    mamba) and attention layers (full_attention, or attention), all Mamba-2 if absent; rope in the attention
    layers only where position_embedding_type is rope (the hub's H models: nope); mamba_fix."""
    granite_fix(config)
    mamba_fix(config)
    act = config.get("hidden_act")
    if act is not None and act not in ACTIVATIONS:  # the experts' and the convolution's: no module of their own
        raise ValueError(f"hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    n, types = config.get("num_hidden_layers"), config.get("layer_types")
    if types is None and isinstance(n, int):
        types = ["linear_attention"] * n
    if not isinstance(types, list):
        raise ValueError(f"layer_types is {types!r}, expected a list")
    config["layer_types"] = [GRANITE4_LAYER_TYPES.get(kind, kind) for kind in types]
    unknown = sorted(set(config["layer_types"]) - {"linear_attention", "full_attention"}, key=str)
    if unknown:
        raise ValueError(f"layer_types has {unknown[0]!r}, expected mamba or attention (linear_attention, "
                         f"full_attention)")
    position = config.get("position_embedding_type")
    if position not in (None, "rope", "nope"):
        raise ValueError(f"position_embedding_type {position!r} is not supported (rope, nope)")
    if position != "rope":
        config["rope_layers"] = [False] * len(types)
    config["shared_expert_intermediate_size"] = config.get("shared_intermediate_size")


def both(*fixes):
    def fix(config):
        for f in fixes:
            f(config)
    return fix


GEMMA2 = {"norm": "rms_offset", "tie_word_embeddings": True, "sliding_window": 4096, "head_dim": 256,
          "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
          "block_norms": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                          "post_feedforward_layernorm")}
COHERE = {"norm": "layer_no_bias", "parallel": True, "block_norms": ("input_layernorm", None, None, None),
          "rope_interleaved": True, "tie_word_embeddings": True, "logit_scale": 0.0625,
          "max_position_embeddings": 8192}
GLM = {"fused_gate_up": True, "rope_interleaved": True, "partial_rotary_factor": 0.5, "attention_bias": True,
       "rms_norm_eps": 1.5625e-7, "head_dim": 128, "num_key_value_heads": 2, "max_position_embeddings": 131072}
# The vision-language models whose language model transformers holds at model.language_model (its output layer
# at lm_head) and saves under language_model.model (language_model.lm_head), beside the image encoder and its
# projector, which are kept as they are
VISION_LANGUAGE = CheckpointNames(
    written=(("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
    modules=(("model.", "model.language_model."), ("lm_head.", "lm_head.")),
    kept=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."))
# Gemma 4: transformers' defaults (per-layer embeddings on)
GEMMA4 = {"tie_word_embeddings": True, "head_dim": 256, "num_key_value_heads": 4, "sliding_window": 512,
          "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144}
# q_proj and o_proj, which every layer has: the last layers of the E models (KV sharing) have no v_proj
GEMMA4_TARGETS = ("self_attn.q_proj", "self_attn.o_proj")
OLMO2 = {"block_norms": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"), "qk_norm": "all"}
MOE = {"mlp": "sparse_moe"}
# transformers' defaults for DeepSeek V2's and V3's latent attention
DEEPSEEK = {**MOE, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128}
DEEPSEEK_V3 = {**DEEPSEEK, "routing": "sigmoid", "router_bias": ("gate.e_score_correction_bias", 1),
               "rope_interleave": True, "n_routed_experts": 256, "n_shared_experts": 1, "moe_intermediate_size": 2048,
               "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
               "routed_scaling_factor": 2.5, "max_position_embeddings": 4096}
# the layers that every config has (the queries' are q_proj, or q_a_proj and q_b_proj, as q_lora_rank says): the
# keys' and values' expansion from the latent, and the output
DEEPSEEK_TARGETS = ("self_attn.kv_b_proj", "self_attn.o_proj")
# LFM2's attention (its norms and output layer's names), feed-forward block and final norm, transformers' defaults
LFM2 = {"qk_norm": "head", "qk_norm_names": ("q_layernorm", "k_layernorm"), "output_proj": "out_proj",
        "block_norms": ("operator_norm", None, "ffn_norm", None), "mlp_module": "feed_forward", "mlp_names": ("w1", "w3", "w2"), "final_norm": "embedding_norm",
        "norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": True, "max_position_embeddings": 128000}
# most of LFM2's layers are short convolutions: their in_proj beside attention's q_proj and v_proj
LFM2_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "conv.in_proj")
# Qwen3-Next's and Qwen3.5's: norms that scale by 1 + weight, queries and keys normed per head, a quarter of each
# head turned by rope, the attention's output gated; the linear attention's sizes as transformers' defaults. Their
# mixture of experts has a shared expert, gated.
QWEN3_NEXT = {"norm": "rms_offset", "qk_norm": "head", "attention_output_gate": True, "partial_rotary_factor": 0.25,
              "head_dim": 256, "num_key_value_heads": 2, "max_position_embeddings": 32768, "linear_num_key_heads": 16,
              "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
              "linear_conv_kernel_dim": 4}
QWEN3_NEXT_MOE = {**MOE, "shared_expert": "shared_expert", "shared_expert_gate": "shared_expert_gate",
                  "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512}
# the reference's q_proj and v_proj, and the linear attention's projection of its queries, keys and values (and z)
QWEN3_NEXT_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "linear_attn.in_proj_qkv")
# Qwen3.5's checkpoints (of the vision-language model) hold the language model at model.language_model, and the
# image encoder at model.visual
QWEN3_5_VISION = CheckpointNames(written=(("model.", "model.language_model."),), kept=("model.visual.",))

# model_type: its Family. A family that fits ModelArgs' switches is one entry here.
FAMILIES = {
    "llama": Family("Llama 1, 2, 3, SmolLM, SmolLM2, TinyLlama, Falcon3, other Llama-shaped models"),
    "mistral": Family("Mistral 7B, Mistral Nemo, Mistral Small"),
    "mixtral": Family("Mixtral 8x7B, 8x22B (mixture of experts)",
                      {**MOE, "moe_module": "block_sparse_moe", "expert_names": ("w1", "w3", "w2")},
                      unquantized=(".block_sparse_moe.gate",)),
    "qwen2": Family("Qwen2, Qwen2.5", {"qkv_bias": True}, sliding_from_max_window_layers),
    "qwen3": Family("Qwen3 (dense)", {"qk_norm": "head", "head_dim": 128}, sliding_from_max_window_layers),
    "gemma": Family("Gemma 2B, 7B", {"norm": "rms_offset", "tie_word_embeddings": True}, gemma_fix),
    "gemma2": Family("Gemma 2", GEMMA2, both(gemma_fix, sliding_every(2))),
    # Gemma3TextConfig's defaults in full: Gemma 3's vision-language configs leave most of them out
    "gemma3_text": Family("Gemma 3 (text), Gemma 3 1B", {
        **GEMMA2, "qk_norm": "head", "final_logit_softcapping": None, "rope_theta": 1e6,
        "rope_local_base_freq": 1e4, "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
        "max_position_embeddings": 131072}, gemma3_fix),
    "smollm3": Family("SmolLM3", {"rope_theta": 2e6, "tie_word_embeddings": True}, smollm3_fix),
    "olmo2": Family("OLMo 2", {**OLMO2, "rms_norm_eps": 1e-5}),
    "olmo3": Family("OLMo 3", {**OLMO2, "rms_norm_eps": 1e-5, "sliding_window": 4096, "rope_theta": 500000.0},
                    olmo3_fix),
    "granite": Family("Granite 3 (dense)", {}, granite_fix),
    "ministral": Family("Ministral 8B", {}),
    "ministral3": Family("Ministral 3 (3B, 8B, 14B), text model", {
        "head_dim": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 262144}, ministral3_fix),
    "exaone4": Family("EXAONE 4.0 (1.2B, 32B)", {
        "block_norms": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"), "qk_norm": "head",
        "rms_norm_eps": 1e-5, "sliding_window": 4096, "sliding_window_pattern": 4}, exaone4_fix),
    "hunyuan_v1_dense": Family("Hunyuan dense (0.5B, 1.8B, 4B, 7B)", {
        "qk_norm": "head_after_rope", "qk_norm_names": ("query_layernorm", "key_layernorm"), "rms_norm_eps": 1e-5},
        hunyuan_fix),
    "seed_oss": Family("Seed-OSS 36B", {"head_dim": 128, "attention_bias": True}, seed_oss_fix),
    "ernie4_5": Family("ERNIE 4.5 0.3B (dense)", {
        "head_dim": 128, "rope_interleaved": True, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5}, ernie4_5_fix),
    "apertus": Family("Apertus 8B, 70B", {
        "block_norms": ("attention_layernorm", None, "feedforward_layernorm", None),
        "mlp_names": (None, "up_proj", "down_proj"), "hidden_act": "xielu", "rms_norm_eps": 1e-5}, apertus_fix),
    "internlm3": Family("InternLM3 8B", {"head_dim": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768},
                        internlm3_fix),
    "granitemoe": Family("Granite 3.0 MoE: granite-3.0-1b-a400m, granite-3.0-3b-a800m (mixture of experts)",
                         {"mlp": "granite_moe", "moe_module": "block_sparse_moe", "num_local_experts": 8,
                          "attention_multiplier": 1.0}, granite_fix),
    # the default targets are in every layer, whichever its mixer (a target that no adapted layer has is an error)
    "granitemoehybrid": Family("Granite 4.0: the H models (Mamba-2 and attention layers; a mixture of experts, or "
                               "dense), Micro (attention)", {
                                   **MAMBA2, "num_local_experts": 8, "shared_intermediate_size": 1024,
                                   "attention_multiplier": 1.0}, granitemoehybrid_fix,
                               lora_targets=("shared_mlp.input_linear", "shared_mlp.output_linear"),
                               layer="GraniteMoeHybridDecoderLayer", carries_state=True),
    "gpt_oss": Family("gpt-oss-20b, gpt-oss-120b (mixture of experts)", {
        "mlp": "gpt_oss_moe", "attention_sinks": True, "attention_bias": True, "head_dim": 64, "rms_norm_eps": 1e-5,
        "sliding_window": 128, "num_local_experts": 128, "num_experts_per_tok": 4, "rope_theta": 150000.0,
        "max_position_embeddings": 131072}, gpt_oss_fix),
    "llama4_text": Family("Llama 4 Scout, Maverick, text only: the language model (mixture of experts)", {
        "mlp": "llama4_moe", "moe_module": "feed_forward", "mlp_module": "feed_forward", "rope_interleaved": True,
        "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "num_local_experts": 16, "num_experts_per_tok": 1, "intermediate_size_mlp": 16384, "use_qk_norm": True,
        "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1},
        llama4_fix),
    "phi": Family("Phi-2, Phi-1.5", {
        "norm": "layer", "parallel": True, "mlp_names": (None, "fc1", "fc2"), "attention_bias": True,
        "mlp_bias": True, "lm_head_bias": True, "hidden_act": "gelu_new", "output_proj": "dense",
        "final_norm": "final_layernorm", "block_norms": ("input_layernorm", None, None, None)},
        lambda config: config.setdefault("partial_rotary_factor", 0.5)),
    "phi3": Family("Phi-3, Phi-3.5 mini", {"fused_qkv": True, "fused_gate_up": True},
                   lora_targets=("self_attn.qkv_proj",)),
    "phi3_v": Family("Phi-3-vision, text only: the language model trains, the image encoder is kept as it is",
                     {"fused_qkv": True, "fused_gate_up": True}, lora_targets=("self_attn.qkv_proj",),
                     names=CheckpointNames(kept=("model.vision_embed_tokens.",))),
    "cohere": Family("Command R, Command R+, Aya 23, Aya Expanse", {**COHERE, "rope_theta": 500000.0}, cohere_fix),
    "cohere2": Family("Command R7B, Command A", {**COHERE, "sliding_window": 4096}, cohere2_fix),
    "starcoder2": Family("StarCoder2 3B, 7B, 15B", {
        "norm": "layer", "mlp_names": (None, "c_fc", "c_proj"), "hidden_act": "gelu_pytorch_tanh",
        "tie_word_embeddings": True, "num_key_value_heads": 2, "use_bias": True, "norm_epsilon": 1e-5,
        "max_position_embeddings": 4096}, starcoder2_fix),
    "glm": Family("GLM-4 9B (glm-4-9b-chat-hf)", GLM, glm_fix),
    "glm4": Family("GLM-4-0414 (9B, 32B), GLM-Z1", {**GLM, "block_norms": (
        "input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm")}, glm_fix),
    "qwen2_moe": Family("Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B (mixture of experts)", {
        **MOE, "qkv_bias": True, "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
        "norm_topk_prob": False, "shared_expert": "shared_expert", "shared_expert_intermediate_size": 5632,
        "shared_expert_gate": "shared_expert_gate"}, qwen2_moe_fix,
        unquantized=(".mlp.gate", ".mlp.shared_expert_gate")),
    "qwen3_moe": Family("Qwen3-30B-A3B, Qwen3-235B-A22B (mixture of experts)", {
        **MOE, "qk_norm": "head", "num_local_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
        "norm_topk_prob": False}, qwen3_moe_fix, unquantized=(".mlp.gate",)),
    "olmoe": Family("OLMoE-1B-7B (mixture of experts)", {
        **MOE, "qk_norm": "all", "rms_norm_eps": 1e-5, "num_experts": 64, "num_experts_per_tok": 8,
        "norm_topk_prob": False}, lambda config: experts_from(config, "num_experts"), unquantized=(".mlp.gate",)),
    "phimoe": Family("Phi-3.5-MoE (mixture of experts)", {
        **MOE, "moe_module": "block_sparse_moe", "expert_names": ("w1", "w3", "w2"), "routing": "sparsemixer",
        "router_jitter_noise": 0.01, "num_local_experts": 16, "norm": "layer", "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "max_position_embeddings": 131072, "rope_mscale": True}, phimoe_fix,
        unquantized=(".block_sparse_moe.gate",)),
    "glm4_moe": Family("GLM-4.5, GLM-4.5-Air (mixture of experts)", {
        **MOE, "routing": "sigmoid", "router_bias": ("gate.e_score_correction_bias", 1), "n_routed_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 1408, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-5}, glm4_moe_fix, dropped=mtp_layer),
    "ernie4_5_moe": Family("ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B (mixture of experts)", {
        **MOE, "router_bias": ("moe_statics.e_score_correction_bias", 2), "moe_num_experts": 64, "moe_k": 6,
        "moe_intermediate_size": 1536, "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
        "rope_interleaved": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
        ernie4_5_moe_fix, unquantized=(".mlp.gate",), dropped=lambda config, name: "mtp" in name),
    "hunyuan_v1_moe": Family("Hunyuan-A13B (mixture of experts)", {
        **MOE, "router_name": "gate.wg", "shared_expert": "shared_mlp", "qk_norm": "head_after_rope",
        "qk_norm_names": ("query_layernorm", "key_layernorm"), "rms_norm_eps": 1e-5, "num_experts": 1,
        "moe_topk": 1}, hunyuan_v1_moe_fix, unquantized=(".mlp.gate.wg",)),
    "deepseek_v2": Family("DeepSeek-V2, V2-Lite, V2.5, DeepSeek-Coder-V2 (mixture of experts, latent attention)", {
        **DEEPSEEK, "rope_interleaved": True, "norm_topk_prob": False, "n_routed_experts": 64, "n_shared_experts": 2,
        "moe_intermediate_size": 1407, "routed_scaling_factor": 1.0}, deepseek_v2_fix, DEEPSEEK_TARGETS,
        unquantized=(".mlp.gate",), layer="LatentAttentionLayer"),
    "deepseek_v3": Family("DeepSeek-V3, V3.1, R1, Moonlight (mixture of experts, latent attention)", DEEPSEEK_V3,
                          deepseek_v3_fix, DEEPSEEK_TARGETS, dropped=mtp_layer, layer="LatentAttentionLayer"),
    # transformers runs it as DeepSeek-V3
    "sarvam_mla": Family("Sarvam-105B (mixture of experts, latent attention)", {
        **DEEPSEEK_V3, "n_routed_experts": 128, "q_lora_rank": None, "n_group": 1, "topk_group": 1,
        "first_k_dense_replace": 1}, sarvam_mla_fix, DEEPSEEK_TARGETS, dropped=mtp_layer,
        layer="LatentAttentionLayer"),
    "mistral3": Family("Mistral Small 3.1, 3.2, Magistral Small, Devstral Small, Ministral 3, text only: the "
                       "language model trains, the image encoder is kept as it is", names=VISION_LANGUAGE,
                       text_types=("mistral", "ministral3")),
    # Gemma3ForConditionalGeneration soft-caps no logits, whatever text_config says
    "gemma3": Family("Gemma 3 4B, 12B, 27B, text only: the language model trains, the image encoder is kept as "
                     "it is", fix=lambda config: config.update(final_logit_softcapping=None), names=VISION_LANGUAGE,
                     text_types=("gemma3_text",)),
    "gemma4_text": Family("Gemma 4 (text): E2B, E4B, 31B, 26B-A4B (mixture of experts)", GEMMA4, gemma4_fix,
                          lora_targets=GEMMA4_TARGETS, unquantized=(".router.proj",), layer="Gemma4DecoderLayer",
                          dropped=gemma4_shared_kv, model="Gemma4Model", layer_at_a_time=False),
    # Gemma4ForConditionalGeneration holds and saves its language model at model.language_model
    "gemma4": Family("Gemma 4 E2B, E4B, 31B, 26B-A4B, text only: the language model trains, the image and audio "
                     "encoders are kept as they are", dropped=gemma4_shared_kv, names=CheckpointNames(
                         written=(("model.", "model.language_model."),), kept=(
                             "model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")),
                     text_types=("gemma4_text",)),
    "falcon": Family("Falcon 7B, 40B, 180B, Falcon2 11B, Falcon-RW (Falcon3 is llama)", {
        "norm": "layer", "tie_word_embeddings": True, "multi_query": True, "parallel_attn": True,
        "fused_qkv": True, "qkv_name": "query_key_value", "attention_module": "self_attention",
        "output_proj": "dense", "mlp_names": (None, "dense_h_to_4h", "dense_4h_to_h"), "final_norm": "ln_f",
        "block_norms": ("input_layernorm", None, None, None)}, falcon_fix,
        lora_targets=("self_attention.query_key_value",),
        names=CheckpointNames(written=(("model.layers.", "transformer.h."),
                                       ("model.embed_tokens.", "transformer.word_embeddings."),
                                       ("model.ln_f.", "transformer.ln_f.")))),
    "lfm2": Family("LFM2 (350M, 700M, 1.2B, 2.6B)", {
        **LFM2, "block_multiple_of": 256, "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": True},
        lfm2_fix, lora_targets=LFM2_TARGETS, layer="Lfm2DecoderLayer", carries_state=True),
    "lfm2_moe": Family("LFM2-8B-A1B (mixture of experts)", {
        **LFM2, **MOE, "moe_module": "feed_forward", "expert_names": ("w1", "w3", "w2"), "routing": "sigmoid",
        "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 1792, "num_dense_layers": 2,
        "use_expert_bias": True}, lfm2_moe_fix, lora_targets=LFM2_TARGETS, layer="Lfm2DecoderLayer",
        carries_state=True),
    # Lfm2VlForConditionalGeneration holds and saves its language model at model.language_model
    "lfm2_vl": Family("LFM2-VL (450M, 1.6B, 3B), text only: the language model trains, the image encoder is kept "
                      "as it is", names=CheckpointNames(written=(("model.", "model.language_model."),), kept=(
                          "model.vision_tower.", "model.multi_modal_projector.")), text_types=("lfm2",)),
    "qwen3_next": Family("Qwen3-Next-80B-A3B (linear attention, mixture of experts)", {
        **QWEN3_NEXT, **QWEN3_NEXT_MOE, "num_experts": 512, "num_experts_per_tok": 10,
        "linear_fused_projections": True}, qwen3_next_fix, QWEN3_NEXT_TARGETS[:2] + ("linear_attn.in_proj_qkvz",),
        (".mlp.gate", ".mlp.shared_expert_gate"), "GatedDeltaDecoderLayer", mtp_weight, carries_state=True),
    "qwen3_5_text": Family("Qwen3.5 0.8B, 2B, 4B, 9B, 27B, text model (linear attention)",
                           {**QWEN3_NEXT, "num_key_value_heads": 4}, gated_delta_fix, QWEN3_NEXT_TARGETS,
                           layer="GatedDeltaDecoderLayer", dropped=mtp_weight, carries_state=True),
    "qwen3_5_moe_text": Family(
        "Qwen3.5 35B-A3B, 122B-A10B, 397B-A17B, text model (linear attention, mixture of experts)",
        {**QWEN3_NEXT, **QWEN3_NEXT_MOE, "num_experts": 256, "num_experts_per_tok": 8}, qwen3_5_moe_fix,
        QWEN3_NEXT_TARGETS, (".mlp.gate", ".mlp.shared_expert_gate"), "GatedDeltaDecoderLayer", mtp_weight,
        carries_state=True),
    "qwen3_5": Family("Qwen3.5 0.8B, 2B, 4B, 9B, 27B, text only: the language model trains, the image encoder is kept "
                      "as it is", dropped=mtp_weight, names=QWEN3_5_VISION, text_types=("qwen3_5_text",)),
    "qwen3_5_moe": Family("Qwen3.5 35B-A3B, 122B-A10B, 397B-A17B, text only: the language model trains, the image "
                          "encoder is kept as it is", dropped=mtp_weight, names=QWEN3_5_VISION,
                          text_types=("qwen3_5_moe_text",)),
    # PEFT refuses adapters on any layer named out_proj (or conv1d) of the Mamba model_types it lists
    "falcon_h1": Family("Falcon-H1 0.5B, 1.5B, 1.5B-Deep, 3B, 7B, 34B (attention and Mamba-2 side by side)", {
        **MAMBA2, "mamba_d_ssm": 1024, "final_norm": "final_layernorm", "rms_norm_eps": 1e-5, "num_key_value_heads": 8,
        "max_position_embeddings": 8192}, both(mamba_fix, falcon_h1_fix),
        lora_targets=("self_attn.q_proj", "self_attn.v_proj", "mamba.in_proj"), layer="FalconH1DecoderLayer",
        carries_state=True, peft_refused=(".mamba.out_proj",)),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp's converter (convert_hf_to_gguf.py) writes a family, for utils.write_gguf: its architecture;
    its tensors' names where they differ from the llama architecture's ({our module path in a decoder layer, or
    from the top: llama.cpp's name}; an expert's path with * for its number: the experts stacked in one tensor);
    whether llama.cpp's rope for it rotates pairs of neighbouring features (then q and k rows are permuted from
    Hugging Face's halves, unless the family's own rope is interleaved already); whether norm weights are stored
    plus one (Gemma's RMSNorm scales by 1 + weight); the activations and rope kinds it computes; `keys`, the
    architecture's own metadata ({GGUFWriter's add_ method without add_: value}) from ModelArgs, which raises
    ValueError naming a setting that llama.cpp's architecture does not compute as the family does; and the
    settings of GGUF_PLAIN that it computes (that `keys` writes or checks): the others must be plain."""
    arch: str
    names: dict = field(default_factory=dict)
    rope_pairs: bool = False
    norm_plus_one: bool = False
    activations: tuple = ("silu",)
    ropes: tuple = ("default", "linear")
    keys: Optional[Callable[["ModelArgs"], dict]] = None
    computes: tuple = ()


# ModelArgs' settings that only some of llama.cpp's architectures compute, at their value in a plain decoder
GGUF_PLAIN = {"embedding_scale": None, "attention_scale": None, "residual_scale": 1.0, "logits_scale": 1.0,
              "attn_logit_softcapping": None, "final_logit_softcapping": None, "rope_layers": None,
              "query_scaling": None, "clip_qkv": None, "qk_l2_norm": False, "attention_sinks": False, "alibi": False}


def gguf_window(args, swa_rope_scaled: bool) -> dict:
    """The sliding window and the layers it applies to (llama.cpp reads a list of one bool a layer); the sliding
    layers' rope base. llama.cpp scales the sliding layers' rope as the others' (swa_rope_scaled) or not at all."""
    full, local = args.rope_parameters["full_attention"], args.rope_parameters["sliding_attention"]
    if local != full and (swa_rope_scaled or local["rope_type"] != "default"
                          or local["partial_rotary_factor"] != full["partial_rotary_factor"]):
        raise ValueError(f"the sliding layers' rope ({local['rope_type']}, theta {local.get('rope_theta')}) is not "
                         f"one llama.cpp computes beside the others'")
    if args.sliding_window is None:
        return {}
    sliding = [args.layer_type(i) == "sliding_attention" for i in range(args.num_hidden_layers)]
    return {"sliding_window": args.sliding_window, "rope_freq_base_swa": local.get("rope_theta", 10000.0),
            "sliding_window_pattern": sliding}


def gguf_experts(args, normalized: bool, *shared) -> dict:
    """Expert sizes: each expert's MLP width, and (named in `shared`) the shared expert's. llama.cpp's
    architecture normalizes the chosen experts' weights or not (`normalized`), and has experts in every layer."""
    if args.norm_topk_prob != normalized:
        raise ValueError(f"norm_topk_prob {args.norm_topk_prob} (llama.cpp's {args.model_type} always has "
                         f"{normalized})")
    if args.moe_layers is not None and not all(args.moe_layers):
        raise ValueError("layers without experts (mlp_only_layers, decoder_sparse_step): llama.cpp has experts in "
                         "every layer")
    keys = {"expert_feed_forward_length": args.moe_intermediate_size or args.intermediate_size}
    if shared:
        keys["expert_shared_feed_forward_length"] = args.shared_expert_intermediate_size
    return keys


def gemma_keys(args) -> dict:
    """llama.cpp scales Gemma's queries by 1 / sqrt(head_dim), or 1 / sqrt(hidden_size / heads) for the 27B shapes
    (46 layers in Gemma 2, 62 in Gemma 3), whatever query_pre_attn_scalar says; it soft-caps Gemma 2's attention
    scores always."""
    big = args.num_hidden_layers == {"gemma2": 46, "gemma3_text": 62}.get(args.model_type)
    scale = (args.hidden_size // args.num_attention_heads if big else args.head_dim) ** -0.5
    if not math.isclose(args.attention_scale or args.head_dim ** -0.5, scale):
        raise ValueError(f"query_pre_attn_scalar {round((args.attention_scale or 0) ** -2)}: llama.cpp's "
                         f"{args.model_type} scales queries by 1/sqrt({round(scale ** -2)})")
    if args.model_type == "gemma":
        return {}
    if args.model_type == "gemma2" and (args.attn_logit_softcapping is None or args.final_logit_softcapping is None):
        raise ValueError("attn_logit_softcapping or final_logit_softcapping null: llama.cpp's gemma2 soft-caps both")
    caps = {"attn_logit_softcapping": args.attn_logit_softcapping,
            "final_logit_softcapping": args.final_logit_softcapping}
    return {**{k: v for k, v in caps.items() if v is not None}, **gguf_window(args, args.model_type == "gemma2")}


def smollm3_keys(args) -> dict:
    # llama.cpp's smollm3 leaves rope out of every 4th layer, whatever no_rope_layers says
    if args.rope_layers is not None and args.rope_layers != [(i + 1) % 4 != 0 for i in range(args.num_hidden_layers)]:
        raise ValueError("no_rope_layers: llama.cpp's smollm3 leaves rope out of every 4th layer, and only those")
    return {}


def granite_keys(args) -> dict:
    if args.head_dim != args.hidden_size // args.num_attention_heads:
        raise ValueError(f"head_dim {args.head_dim}: llama.cpp's granite has hidden_size / num_attention_heads")
    return {"attention_scale": args.attention_scale or args.head_dim ** -0.5,
            "embedding_scale": args.embedding_scale or 1.0, "residual_scale": args.residual_scale,
            "logit_scale": 1 / args.logits_scale}


def cohere_keys(args) -> dict:
    if (args.qk_norm is not None) != (args.num_hidden_layers >= 64):
        raise ValueError(f"use_qk_norm {args.qk_norm is not None} with {args.num_hidden_layers} layers: llama.cpp's "
                         f"command-r norms queries and keys in models of 64 layers or more (Command R+) alone")
    return {"logit_scale": args.logits_scale}


def cohere2_keys(args) -> dict:
    # rope in the sliding layers alone
    if args.rope_layers != [args.layer_type(i) == "sliding_attention" for i in range(args.num_hidden_layers)]:
        raise ValueError("rope in other layers than the sliding ones: llama.cpp's cohere2 rotates those alone")
    return {"logit_scale": args.logits_scale, **gguf_window(args, True)}


def ernie4_5_keys(args) -> dict:
    if args.mlp_bias or args.lm_head_bias:
        raise ValueError("use_bias: llama.cpp's ernie4_5 has no MLP or output layer biases")
    return {}


def olmoe_keys(args) -> dict:
    if args.num_key_value_heads != args.num_attention_heads:
        raise ValueError(f"num_key_value_heads {args.num_key_value_heads}: llama.cpp's olmoe has as many as "
                         f"num_attention_heads ({args.num_attention_heads})")
    return gguf_experts(args, False)


def exaone4_keys(args) -> dict:
    # a sliding window (4096) in the 64-layer models alone (EXAONE 4.0 32B), and rope in their sliding layers alone
    if args.num_attention_heads * args.head_dim != args.hidden_size:
        raise ValueError(f"head_dim {args.head_dim}: llama.cpp's exaone4 has hidden_size / num_attention_heads")
    if (args.sliding_window is not None) != (args.num_hidden_layers == 64):
        raise ValueError(f"sliding_window {args.sliding_window} with {args.num_hidden_layers} layers: llama.cpp's "
                         f"exaone4 has a window in models of 64 layers alone")
    return gguf_window(args, True)


# OLMo 2's names, and Gemma 2's and 3's: the norms after attention and the MLP, and before the MLP
POST_NORMS = {"post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm"}
GEMMA2_NAMES = {**POST_NORMS, "pre_feedforward_layernorm": "ffn_norm"}
QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
# each expert's gate, up and down layers, under their names in the family, stacked
STACKED = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
QWEN_MOE = {"mlp.gate": "ffn_gate_inp", **{f"mlp.experts.*.{n}_proj": name for n, name in STACKED.items()}}
LLAMA = GGUFArch("llama", rope_pairs=True, ropes=("default", "linear", "llama3"))
# Gemma's embeddings times sqrt(hidden_size) and queries' scale are llama.cpp's own (gemma_keys checks the scale)
GEMMA = GGUFArch("gemma", norm_plus_one=True, activations=("gelu_pytorch_tanh", "gelu_new", "gelu"), keys=gemma_keys,
                 computes=("embedding_scale", "attention_scale"))
SOFTCAPS = ("attn_logit_softcapping", "final_logit_softcapping")

# model_type: how llama.cpp's converter writes it, for the families llama.cpp has an architecture for. Vision-language
# models are their language model's family.
GGUF_ARCHS = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "mixtral": replace(LLAMA, names={"block_sparse_moe.gate": "ffn_gate_inp", **{
        f"block_sparse_moe.experts.*.{w}": STACKED[n] for n, w in zip(("gate", "up", "down"), ("w1", "w3", "w2"))}},
        keys=lambda args: gguf_experts(args, True)),
    "qwen2": GGUFArch("qwen2"),
    "qwen3": GGUFArch("qwen3", QK_NORMS),
    "qwen2_moe": GGUFArch("qwen2moe", {**QWEN_MOE, "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
                                       "mlp.shared_expert.up_proj": "ffn_up_shexp",
                                       "mlp.shared_expert.down_proj": "ffn_down_shexp",
                                       "mlp.shared_expert_gate": "ffn_gate_inp_shexp"},
                          keys=lambda args: gguf_experts(args, False, "shared")),
    "qwen3_moe": GGUFArch("qwen3moe", {**QWEN_MOE, **QK_NORMS}, keys=lambda args: gguf_experts(args, True)),
    "gemma": GEMMA,
    "gemma2": replace(GEMMA, arch="gemma2", names=GEMMA2_NAMES, computes=GEMMA.computes + SOFTCAPS),
    "gemma3_text": replace(GEMMA, arch="gemma3", names={**GEMMA2_NAMES, **QK_NORMS},
                           computes=GEMMA.computes + SOFTCAPS),
    "phi3": GGUFArch("phi3", {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
                     ropes=("default", "longrope"), keys=lambda args: {"sliding_window": args.sliding_window or 0}),
    "olmo2": GGUFArch("olmo2", {**POST_NORMS, **QK_NORMS}),
    "olmo3": GGUFArch("olmo2", {**POST_NORMS, **QK_NORMS}, keys=lambda args: gguf_window(args, False)),
    "granite": replace(LLAMA, arch="granite", keys=granite_keys, computes=(
        "attention_scale", "embedding_scale", "residual_scale", "logits_scale")),
    "starcoder2": GGUFArch("starcoder2", {"mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
                           activations=GEMMA.activations),
    "cohere": GGUFArch("command-r", QK_NORMS, rope_pairs=True, ropes=("default",), keys=cohere_keys,
                       computes=("logits_scale",)),
    "cohere2": GGUFArch("cohere2", rope_pairs=True, ropes=("default",), keys=cohere2_keys,
                        computes=("logits_scale", "rope_layers")),
    "glm4": GGUFArch("glm4", {"mlp.gate_up_proj": "ffn_up", "post_self_attn_layernorm": "post_attention_norm",
                              "post_mlp_layernorm": "post_ffw_norm"}, rope_pairs=True),
    "smollm3": GGUFArch("smollm3", rope_pairs=True, keys=smollm3_keys, computes=("rope_layers",)),
    "olmoe": GGUFArch("olmoe", {**QWEN_MOE, **QK_NORMS}, keys=olmoe_keys),
    "seed_oss": GGUFArch("seed_oss", {"post_attention_layernorm": "post_attention_norm"}),
    "internlm3": LLAMA,
    "ernie4_5": GGUFArch("ernie4_5", rope_pairs=True, keys=ernie4_5_keys),
    "exaone4": GGUFArch("exaone4", {**POST_NORMS, **QK_NORMS}, ropes=("default", "linear", "llama3"), keys=exaone4_keys,
                        computes=("rope_layers",)),
}
ROPE_PARAMETERS = ("rope_theta", "partial_rotary_factor")
LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def nested_rope(config: dict) -> bool:
    """Whether rope_parameters holds one set for each layer type (transformers 5's Gemma 3)."""
    rope = config.get("rope_parameters")
    return isinstance(rope, dict) and any(key in rope for key in LAYER_TYPES)


def flat_rope(config: dict) -> dict:
    """One set of rope parameters ({rope_type, rope_theta, ...}) from either layout: transformers 5's
    rope_parameters, or transformers 4's rope_theta and partial_rotary_factor at the top with the rest in
    rope_scaling (where type may stand for rope_type, and Phi-3's longrope was called su)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_scaling is {rope!r}, expected an object")
    rope = dict(rope)
    kind = rope.pop("type", None)
    rope["rope_type"] = rope.get("rope_type") or kind or "default"
    if rope["rope_type"] == "su":
        rope["rope_type"] = "longrope"
    for key in ROPE_PARAMETERS:
        if rope.get(key) is None and config.get(key) is not None:
            rope[key] = config[key]
    rope.setdefault("partial_rotary_factor", 1.0)
    if config.get("original_max_position_embeddings") and rope["rope_type"] == "longrope":
        rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    return rope


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
    # {layer type: {rope_type, rope_theta, partial_rotary_factor, the kind's own keys}} (rope_for)
    rope_parameters: Optional[dict] = None
    rope_layers: Optional[list] = None  # per layer, whether it uses rope (all if None)
    rope_interleaved: bool = False  # rotates pairs of neighbouring features, not the two halves
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None
    # "full_attention", "sliding_attention", "chunked_attention", per layer; or a layer that carries a state:
    # "linear_attention" (Qwen3-Next's gated delta rule, Granite 4's Mamba-2), "conv" (LFM2's short convolution)
    layer_types: Optional[list] = None
    attention_chunk_size: Optional[int] = None  # chunked_attention: only keys of the query's chunk (Llama 4)
    hidden_act: str = "silu"
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: Optional[int] = None  # each expert's (intermediate_size if None)
    norm_topk_prob: bool = True  # the chosen experts' weights scaled to sum to 1
    # the experts are chosen from the topk_group of n_group groups whose group_score_top best scores sum highest
    n_group: int = 1
    topk_group: int = 1
    group_score_top: int = 2
    routed_scaling_factor: float = 1.0  # the chosen experts' weights times it
    router_jitter_noise: float = 0.0  # the sparse mixer weighs an expert against those within 2x it (relative)
    shared_expert_intermediate_size: Optional[int] = None
    # family switches (FAMILIES)
    # rms, rms_offset (Gemma: weight + 1), layer (LayerNorm with bias), layer_no_bias (LayerNorm, weight alone)
    norm: str = "rms"
    # the norms of a decoder layer: (before attention, after it, before the MLP, after it), None where absent
    block_norms: tuple = ("input_layernorm", None, "post_attention_layernorm", None)
    # queries and keys normed over each head's features before rope (head; each_head: with each head's own
    # weights, a LayerNorm without bias, Cohere) or after it (head_after_rope), or over all of them (all)
    qk_norm: Optional[str] = None
    qk_norm_names: tuple = ("q_norm", "k_norm")  # the checkpoint's names of the query and key norms
    clip_qkv: Optional[float] = None  # queries, keys and values clipped to [-clip_qkv, clip_qkv] (after "all" norms)
    # longrope's short frequencies at every length, times short_mscale, or long_mscale past the original context
    # (Phi-3.5-MoE)
    rope_mscale: bool = False
    mlp: str = "gated"  # gated (mlp_names' gate, up, down), or a mixture of experts (FEED_FORWARD)
    moe_module: str = "mlp"  # the checkpoint's name for a mixture of experts block
    moe_layers: Optional[list] = None  # per layer, whether its block is the mixture of experts (all if None)
    expert_names: tuple = ("gate_proj", "up_proj", "down_proj")  # the checkpoint's names of each expert's layers
    # how the router's scores choose and weigh the experts: softmax, sigmoid (GLM-4.5), or sparsemixer
    # (Phi-3.5-MoE's, in eval mode: two experts)
    routing: str = "softmax"
    router_name: str = "gate"  # the checkpoint's name for the router's linear layer in the block
    # (the checkpoint's name in the block, number of axes) of a bias added to the scores that choose the
    # experts, not to their weights
    router_bias: Optional[tuple] = None
    shared_expert: Optional[str] = None  # the checkpoint's name of an MLP in the block that every token goes through
    shared_expert_gate: Optional[str] = None  # of a Linear(hidden, 1): the shared MLP's output times its sigmoid
    qk_l2_norm: bool = False  # queries and keys divided by their RMS over each head's features after rope, no weight
    attn_temperature_tuning: bool = False  # query_scaling in the layers without rope alone (Llama 4)
    attention_sinks: bool = False  # a learned logit per head (sinks) joins each softmax over the keys (gpt-oss)
    # multi-head latent attention (DeepSeek, LatentAttention): the queries' bottleneck (none if None), the keys' and
    # values' latent; each head's query and key features without rope and with it, and its value's
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = None
    qk_nope_head_dim: Optional[int] = None
    qk_rope_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None
    mlp_module: str = "mlp"  # the checkpoint's name for the other layers' MLP
    intermediate_size_mlp: Optional[int] = None  # those MLPs' width where intermediate_size is the experts' (Llama 4)
    swiglu_alpha: float = 1.702  # gpt-oss's experts' activation: (up + 1) * gate * sigmoid(alpha * gate),
    swiglu_limit: float = 7.0  # gate clipped above at the limit, up on both sides
    mlp_names: tuple = ("gate_proj", "up_proj", "down_proj")  # gate None: down(act(up(x)))
    fused_qkv: bool = False  # q/k/v in one layer, qkv_name (Phi-3, Falcon)
    qkv_name: str = "qkv_proj"  # the checkpoint's name for the fused q/k/v layer
    qkv_grouped: bool = False  # that layer's outputs by key-value head: its queries, key, value (Falcon)
    fused_gate_up: bool = False  # gate/up in one gate_up_proj (Phi-3, GLM)
    attention_module: str = "self_attn"  # the checkpoint's name for a decoder layer's attention block
    parallel: bool = False  # attention and MLP side by side on one norm's output (Phi-2), or each on its own
    qkv_bias: bool = False
    attention_out_bias: bool = False  # o_proj's bias, where q, k and v have none (Seed-OSS)
    lm_head_bias: bool = False
    embedding_scale: Optional[float] = None  # embeddings times it (Gemma: sqrt(hidden_size), in their dtype)
    attention_scale: Optional[float] = None  # of the scores; head_dim ** -0.5 if None
    # (beta, length, first): queries times 1 + beta * log(1 + (position + first) // length) after rope (Ministral 3;
    # Llama 4's temperature tuning)
    query_scaling: Optional[tuple] = None
    residual_scale: float = 1.0  # each block's output times it before it joins the residual stream (Granite)
    logits_scale: float = 1.0
    attn_logit_softcapping: Optional[float] = None  # scores become cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: Optional[float] = None  # the same for the logits
    alibi: bool = False  # each head's scores plus its slope times the key's position, in place of rope (Falcon-RW)
    output_proj: str = "o_proj"
    final_norm: str = "norm"
    wrapper: Optional[str] = None  # the vision-language model_type whose language model this is (language_model)
    # where layers differ (Gemma 4), per layer: its head size, K/V heads and MLP width
    layer_head_dims: Optional[list] = None
    layer_kv_heads: Optional[list] = None
    layer_intermediate_sizes: Optional[list] = None
    # per layer: "store" (the later layers of its type reuse its K/V), "reuse" (attends to those, has no K/V of
    # its own) or None (Gemma 4's num_kv_shared_layers)
    kv_sharing: Optional[list] = None
    attention_k_eq_v: bool = False  # full-attention layers' values are their keys' projection (no v_proj)
    hidden_size_per_layer_input: Optional[int] = None  # Gemma 4's per-layer embeddings: their size per layer
    vocab_size_per_layer_input: Optional[int] = None  # and their table's rows
    conv_L_cache: int = 3  # a short convolution's taps: it reads its input's last conv_L_cache positions (LFM2)
    conv_bias: bool = False  # biases in the short convolution and its in_proj and out_proj
    # gated delta-rule linear attention (GatedDeltaNet) in the layers of type "linear_attention" (Qwen3-Next, Qwen3.5)
    linear_num_key_heads: Optional[int] = None
    linear_num_value_heads: Optional[int] = None  # each key head's queries and keys serve as many value heads in turn
    linear_key_head_dim: Optional[int] = None
    linear_value_head_dim: Optional[int] = None
    linear_conv_kernel_dim: Optional[int] = None
    linear_fused_projections: bool = False  # q, k, v, z in one in_proj_qkvz, b and a in in_proj_ba, by key head
    attention_output_gate: bool = False  # q_proj gives each head's queries then its gate: output times sigmoid(gate)
    # Mamba-2 layers (Mamba2Mixer): mamba_n_heads heads of mamba_d_head features, each feature with a state of
    # mamba_d_state numbers, B and C shared by the heads of each of mamba_n_groups groups; a causal convolution over
    # mamba_d_conv positions; the scan's parallel form over chunks of mamba_chunk_size positions
    mamba_n_heads: Optional[int] = None
    mamba_d_head: Optional[int] = None
    mamba_d_state: Optional[int] = None
    mamba_n_groups: int = 1
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: Optional[list] = None  # [low, high]: the time steps clipped to it (high None: no bound)
    # Falcon-H1's muP multipliers (FalconH1DecoderLayer): of the keys; of attention's and the Mamba-2 mixer's inputs
    # and outputs; of its MLP's gate and output (mlp_multipliers); of the mixer's in_proj's parts (ssm_multipliers)
    key_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    mlp_multipliers: Optional[list] = None
    ssm_multipliers: Optional[list] = None
    # and its Mamba-2 mixers': whether they norm the gated output (over each group), before the gate or after it;
    # out_proj's bias
    mamba_rms_norm: bool = False
    mamba_norm_before_gate: bool = True
    projectors_bias: bool = False

    @classmethod
    def from_config(cls, config: dict, values: Optional[int] = None) -> "ModelArgs":
        """The config's ModelArgs; `values`, where known, the weights' count of values, which no size can
        exceed (check_types)."""
        family = FAMILIES.get(config.get("model_type"))
        if family is None:
            raise ValueError(
                f"model_type {config.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        wrapper = family if family.text_types else None
        if wrapper is not None:
            config = language_model(config, wrapper)
            family = FAMILIES[config["model_type"]]
        config = {**family.switches, **config}
        if family.fix is not None:
            family.fix(config)
        if wrapper is not None and wrapper.fix is not None:
            wrapper.fix(config)
        if config.get("qk_layernorm"):
            raise ValueError("qk_layernorm is not supported")
        if nested_rope(config):
            given = config["rope_parameters"]
            ropes = {kind: flat_rope({**config, "rope_parameters": given.get(kind)}) for kind in LAYER_TYPES}
        else:
            ropes = dict.fromkeys(LAYER_TYPES, flat_rope(config))
        config["rope_parameters"] = ropes
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in config.items() if k in names and v is not None}
        check_types(given, values)
        args = cls(**given)
        if args.hidden_act not in ACTIVATIONS and args.hidden_act not in ACTIVATION_MODULES:
            raise ValueError(f"hidden_act {args.hidden_act!r} is not supported "
                             f"({', '.join([*ACTIVATIONS, *ACTIVATION_MODULES])})")
        args.num_key_value_heads = args.num_key_value_heads or args.num_attention_heads
        args.head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
        for key in ("layer_types", "rope_layers", "moe_layers", "layer_head_dims", "layer_kv_heads",
                    "layer_intermediate_sizes", "kv_sharing"):
            if getattr(args, key) is not None and len(getattr(args, key)) != args.num_hidden_layers:
                raise ValueError(f"{key} lists {len(getattr(args, key))} layers, not num_hidden_layers "
                                 f"{args.num_hidden_layers}")
        for kv_heads, head_dim in set(zip(args.layer_kv_heads or [args.num_key_value_heads],
                                          args.layer_head_dims or [args.head_dim])):
            if args.num_attention_heads % kv_heads or head_dim == 0:
                raise ValueError(f"{args.num_attention_heads} attention heads cannot share {kv_heads} "
                                 f"key-value heads of {head_dim} features")
        for rope in args.rope_parameters.values():
            RoPE(args, rope)  # its errors now, not when the model is built
        return args

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def packs_by_example(self) -> bool:
        """Whether packed examples must each take a row of their own, as packed_layout's by_example lays them out,
        not share one row under a mask: where attention depends on the positions themselves, not only on the
        distance between them (a weighted norm after rope, queries scaled by position, chunks of positions), for
        each example to start at position 0; where layers carry a state along the row (Family.carries_state),
        for no state to flow from one example into the next."""
        return (self.qk_norm == "head_after_rope" or self.query_scaling is not None
                or self.attention_chunk_size is not None or self.family.carries_state)

    @property
    def names(self) -> CheckpointNames:
        names = FAMILIES[self.wrapper or self.model_type].names
        return replace(names, experts=self.expert_names) if self.mlp == "sparse_moe" else names

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else "sliding_attention"

    def rope_for(self, layer: int) -> Optional[dict]:
        """The rope parameters of decoder layer `layer`, None if it uses none."""
        if self.rope_layers is not None and not self.rope_layers[layer]:
            return None
        return self.rope_parameters[self.layer_type(layer)]

    @property
    def rope(self) -> dict:
        """The rope parameters of the layers that attend to the whole sequence."""
        return self.rope_parameters["full_attention"]

    @property
    def rope_type(self) -> str:
        return self.rope["rope_type"]


def checkpoint_names(config: dict) -> CheckpointNames:
    """The names of the weights of a checkpoint with this config (one ModelArgs.from_config accepts)."""
    return ModelArgs.from_config(config).names


LARGEST_SIZE = 2**31 - 1  # MLX's array dimensions are 32-bit: a larger one fails deep inside it, with a traceback
# ModelArgs' fields whose numbers are not sizes of arrays: counts of positions, rope's parameters
UNSIZED_FIELDS = ("max_position_embeddings", "sliding_window", "attention_chunk_size", "rope_parameters")


def check_types(config: dict, values: Optional[int] = None):
    """Each of ModelArgs' fields in `config` of its type and, if a number, positive (num_local_experts and
    router_jitter_noise: at least 0) and finite, the numbers in its lists and objects too; the fields without
    a default present. No size may exceed MLX's largest, nor `values` (the weights' count of values) if given:
    a config's sizes are trusted when the model is built, and absurd ones take all the memory or time."""
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
        if number and (value < 0 if f.name in ("num_local_experts", "router_jitter_noise") else value <= 0):
            raise ValueError(f"{f.name} is {value!r}, expected a positive number")
        for name, n in numbers_in(f.name, value):
            if isinstance(n, float) and not math.isfinite(n):
                raise ValueError(f"{name} is {n}, expected a finite number")
            if isinstance(n, int) and abs(n) > LARGEST_SIZE:
                raise ValueError(f"{name} is {n:.3g}, expected at most {LARGEST_SIZE} (MLX's largest size)")
            if isinstance(n, int) and values is not None and n > values and f.name not in UNSIZED_FIELDS:
                raise ValueError(f"{name} is {n}, more than the {values} values of all the weights")


def numbers_in(name: str, value):
    """(name, number) of each number in a config value: itself, or those in its lists and objects (rope
    parameters, per-layer lists), named by their key."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from numbers_in(key, inner)
    elif isinstance(value, list):
        for inner in value:
            yield from numbers_in(name, inner)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield name, value


# The decoder


class RoPE(nn.Module):
    """Rotary embedding of the first head_dim * partial_rotary_factor features, with each scaling kind that
    transformers reads (modeling_rope_utils): linear, dynamic (NTK), yarn, llama3, longrope (long-context
    frequencies once the sequence is longer than the original context), Hunyuan's ntk_alpha, and proportional
    (Gemma 4: the whole head, of whose pairs the first partial_rotary_factor turn, at the whole head's
    frequencies). yarn's and longrope's attention factor multiplies cos and sin in transformers: the rotated
    features of q and k here. head_dim: the layer's, where layers differ."""

    def __init__(self, args: ModelArgs, rope: dict, head_dim: Optional[int] = None):
        super().__init__()
        kind = rope.get("rope_type", "default")
        if kind not in ROPE_KINDS:
            raise ValueError(f"rope_type {kind!r} is not supported ({', '.join(ROPE_KINDS)})")
        head_dim = head_dim or args.head_dim
        rotated = rope.get("partial_rotary_factor", 1.0)
        self.dims = head_dim if kind == "proportional" else int(head_dim * rotated)
        self.traditional = args.rope_interleaved
        self.base = rope.get("rope_theta", 10000.0)
        if kind == "ntk_alpha":  # dynamic NTK's larger base, for a fixed alpha rather than the length
            self.base = self.base * rope["alpha"] ** (self.dims / (self.dims - 2))
        self.original_context, self._long_freqs, self._dynamic = None, None, None
        inv_freq = 1.0 / (self.base ** (np.arange(0, self.dims, 2, dtype=np.float64) / self.dims))
        gain = long_gain = 1.0
        if kind == "linear":
            inv_freq = inv_freq / rope["factor"]
        elif kind == "dynamic":  # a larger base once the sequence outgrows max_position_embeddings
            self._dynamic = (rope["factor"], args.max_position_embeddings)
        elif kind == "llama3":
            factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
            old_context = rope["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
            smooth = (old_context / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
            inv_freq = np.where(medium, smoothed, scaled)
        elif kind == "yarn":
            inv_freq, gain = yarn_frequencies(inv_freq, self.dims, self.base, rope, args.max_position_embeddings)
        elif kind == "longrope":
            self.original_context = rope.get("original_max_position_embeddings") or args.max_position_embeddings
            if args.rope_mscale:
                gain, long_gain = rope["short_mscale"], rope["long_mscale"]
            else:
                factor = rope.get("factor") or args.max_position_embeddings / self.original_context
                gain = long_gain = rope.get("attention_factor") or (
                    math.sqrt(1 + math.log(factor) / math.log(self.original_context)) if factor > 1 else 1.0)
                self._long_freqs = mx.array(np.array(rope["long_factor"]) / inv_freq, dtype=mx.float32)
            inv_freq = inv_freq / np.array(rope["short_factor"])
        elif kind == "proportional":  # the pairs past the turning ones keep angle 0 (an infinite wavelength)
            inv_freq[int(rotated * head_dim // 2):] = 0.0
            inv_freq = inv_freq / rope.get("factor", 1.0)
        self.gain = gain  # up to the original context (yarn's and longrope's attention factor)
        self._gain = self._long_gain = None  # the rotated features' gain, up to the original context and past it
        if gain != 1.0 or long_gain != 1.0:
            self._gain, self._long_gain = (mx.array([g] * self.dims + [1.0] * (head_dim - self.dims))
                                           for g in (gain, long_gain))
        # wavelengths / 2pi, as mx.fast.rope takes
        self._freqs = mx.array(np.divide(1.0, inv_freq, out=np.full_like(inv_freq, np.inf), where=inv_freq > 0),
                               dtype=mx.float32)

    def frequencies(self, length: int):
        """The wavelengths / 2pi for a sequence of `length` positions."""
        if self._long_freqs is not None and length > self.original_context:
            return self._long_freqs
        if self._dynamic is not None and length > self._dynamic[1]:
            factor, context = self._dynamic
            base = self.base * (factor * length / context - (factor - 1)) ** (self.dims / (self.dims - 2))
            return mx.array(base ** (np.arange(0, self.dims, 2, dtype=np.float64) / self.dims), dtype=mx.float32)
        return self._freqs

    def __call__(self, x, offset: int):
        if self._gain is not None:
            long = self.original_context is not None and offset + x.shape[2] > self.original_context
            x = x * (self._long_gain if long else self._gain).astype(x.dtype)
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset,
                            freqs=self.frequencies(offset + x.shape[2]))


def yarn_frequencies(inv_freq, dims: int, base: float, rope: dict, max_position_embeddings: int):
    """YaRN's (inverse frequencies, attention factor): interpolated by `factor` below the correction range
    of wavelengths, kept above it, blended linearly within it."""
    context = rope.get("original_max_position_embeddings") or max_position_embeddings
    factor = rope.get("factor") or max_position_embeddings / context
    gain = rope.get("attention_factor")
    if gain is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        gain = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)

    def correction(rotations):
        return dims * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction(rope.get("beta_fast") or 32), correction(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    ramp = np.clip((np.arange(dims // 2) - low) / ((high - low) or 0.001), 0, 1)
    kept = 1 - ramp
    return inv_freq / factor * (1 - kept) + inv_freq * kept, gain


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


ROPE_KINDS = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "ntk_alpha", "proportional")


class KVCache:
    step = 256  # positions the buffers grow by: each token's keys and values are written in place, not copied whole

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0

    def update(self, keys, values):
        """The keys and values of every position so far: those cached, then these. A cache started at an offset
        holds that many zeros first, which attention masks: a row's left padding (utils.prefilled)."""
        start, end = self.offset, self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            def grown(cached, new):  # room for `step` positions after these
                room = mx.zeros((*new.shape[:2], end + self.step, *new.shape[3:]), new.dtype)
                return room if cached is None else mx.concatenate([cached[:, :, :start], room[:, :, start:]], axis=2)

            self.keys, self.values = grown(self.keys, keys), grown(self.values, values)
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class StateCache:
    """What a layer that carries a state along the row (Family.carries_state) keeps between calls in generation:
    its states by name (a scan's, the last inputs of a short convolution), as the layer sets them, and the
    positions seen (offset), which the layer advances."""

    def __init__(self):
        self.states = {}
        self.offset = 0


def attention_mask(length: int, offset: int, window: Optional[int], examples=None, chunk: Optional[int] = None):
    """Causal mask for `length` queries after `offset` cached positions, limited to a sliding window, or to the
    query's chunk of `chunk` positions (chunked attention, counted from the row's first position); for rows
    packing several examples, also to each query's own example (`examples`: each position's, batch x (offset +
    length); -1 marks padding, which attends to padding alone)."""
    if examples is None and all(n is None or offset + length <= n for n in (window, chunk)):
        return "causal" if length > 1 else None
    query = mx.arange(offset, offset + length)[:, None]
    key = mx.arange(offset + length)[None]
    mask = key <= query if window is None else (key <= query) & (key > query - window)
    if chunk is not None:
        mask = mask & (key // chunk == query // chunk)
    if examples is None:
        return mask
    return mask & (examples[:, None, -length:, None] == examples[:, None, None, :])


def alibi_slopes(heads: int) -> mx.array:
    """ALiBi's slope for each head, as BLOOM's and transformers' Falcon compute them."""
    n = 2 ** math.floor(math.log2(heads))
    slopes = [np.float32(2 ** -(2 ** -(math.log2(n) - 3))) ** i for i in range(1, n + 1)]
    extra = np.float32(2 ** -(2 ** -(math.log2(2 * n) - 3)))
    slopes += [extra ** i for i in range(1, 1 + 2 * min(n, heads - n), 2)]
    return mx.array(np.array(slopes, np.float32))


def alibi_mask(mask, slopes, length: int, offset: int, head_dim: int, dtype, examples=None):
    """attention_mask's `mask` (for `length` queries after `offset` cached positions; `examples`, those of a
    packed row) as one added to the scaled scores, that adds each head's slope times each key's position (in its
    own example), scaled as the scores are. transformers computes that product in bfloat16 whatever the model's
    type, and its rounding shows in the logits: so here too, and so packed examples' positions start at 0."""
    keys = offset + length
    positions = mx.arange(keys)[None]
    if examples is not None:
        starts = examples != mx.concatenate([examples[:, :1] - 1, examples[:, :-1]], axis=1)
        positions = positions - mx.cummax(mx.where(starts, positions, 0), axis=1)
    bias = slopes.astype(mx.bfloat16)[:, None, None] * positions[:, None, None].astype(mx.bfloat16)
    bias = bias.astype(dtype) / math.sqrt(head_dim)
    if mask is None:
        return bias
    if isinstance(mask, str):
        mask = mx.arange(offset, keys)[:, None] >= mx.arange(keys)[None]
    return mx.where(mask if mask.ndim == 4 else mask[None, None], bias, mx.finfo(dtype).min)


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
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        dim, q_dims, kv_dims = args.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        bias = args.attention_bias or args.qkv_bias
        self.qkv_name = args.qkv_name if args.fused_qkv else None
        self.qkv_grouped = args.qkv_grouped
        self.output_gate = args.attention_output_gate
        if self.qkv_name is not None:
            self[self.qkv_name] = nn.Linear(dim, q_dims + 2 * kv_dims, bias=bias)
        else:
            self.q_proj = nn.Linear(dim, q_dims * (2 if self.output_gate else 1), bias=bias)
            self.k_proj = nn.Linear(dim, kv_dims, bias=bias)
            self.v_proj = nn.Linear(dim, kv_dims, bias=bias)
        self.output_proj = args.output_proj
        self[self.output_proj] = nn.Linear(q_dims, dim, bias=args.attention_bias or args.attention_out_bias)
        self.qk_norm, self.clip = args.qk_norm, args.clip_qkv
        if args.qk_norm:
            self.qk_norm_names = args.qk_norm_names
            if args.qk_norm == "each_head":
                norms = (EachHeadLayerNorm(self.n_heads, self.head_dim, args.layer_norm_eps),
                         EachHeadLayerNorm(self.n_kv_heads, self.head_dim, args.layer_norm_eps))
            else:
                whole = args.qk_norm == "all"
                norms = (norm(args, q_dims if whole else self.head_dim),
                         norm(args, kv_dims if whole else self.head_dim))
            self[self.qk_norm_names[0]], self[self.qk_norm_names[1]] = norms
        rope = args.rope_for(layer)
        self.rope = RoPE(args, rope) if rope is not None else None
        self.qk_l2_norm, self.eps = args.qk_l2_norm and rope is not None, args.rms_norm_eps
        self.scale = args.attention_scale or self.head_dim**-0.5
        self.softcap = args.attn_logit_softcapping
        self.query_scaling = None if args.attn_temperature_tuning and rope is not None else args.query_scaling
        if args.attention_sinks:
            self.sinks = mx.zeros((self.n_heads,))

    def __call__(self, x, mask, cache=None, example_rows=None):
        """example_rows: a packed row's {"slots", "order"} (packed_layout), to attend one example a row."""
        if example_rows is not None:
            return in_example_rows(lambda rows: self(rows, mask, cache), x, example_rows)
        if self.qkv_name is not None:
            q, k, v = self.split_qkv(self[self.qkv_name](x))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        gate = None
        if self.output_gate:  # each head's queries, then its gate
            *lead, _ = q.shape
            q, gate = (y.reshape(*lead, -1) for y in mx.split(q.reshape(*lead, self.n_heads, -1), 2, axis=-1))
        if self.qk_norm == "all":
            q, k = self.normed_qk(q, k)
        if self.clip is not None:
            q, k, v = (mx.clip(y, -self.clip, self.clip) for y in (q, k, v))
        out = self.attend(q, k, v, mask, cache)
        return self[self.output_proj](out if gate is None else out * mx.sigmoid(gate))

    def split_qkv(self, qkv):
        """q, k and v from the fused layer's output: all queries, then keys, then values; or (qkv_grouped) each
        key-value head's queries, key and value in turn."""
        if not self.qkv_grouped:
            q_dims, kv_dims = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            return mx.split(qkv, [q_dims, q_dims + kv_dims], axis=-1)
        *lead, _ = qkv.shape
        groups = qkv.reshape(*lead, self.n_kv_heads, -1, self.head_dim)
        return (groups[..., :-2, :].reshape(*lead, -1), groups[..., -2, :].reshape(*lead, -1),
                groups[..., -1, :].reshape(*lead, -1))

    def attend(self, q, k, v, mask, cache):
        B, L, _ = q.shape
        q = q.reshape(B, L, self.n_heads, -1)
        k = k.reshape(B, L, self.n_kv_heads, -1)
        if self.qk_norm in ("head", "each_head"):
            q, k = self.normed_qk(q, k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        if self.qk_norm == "head_after_rope":
            q, k = self.normed_qk(q, k)
        if self.query_scaling is not None:
            q = q * self.query_scale(offset, L).astype(q.dtype)
        if self.qk_l2_norm:
            q, k = mx.fast.rms_norm(q, None, self.eps), mx.fast.rms_norm(k, None, self.eps)
        if cache is not None:
            k, v = cache.update(k, v)
        out = attention(q, k, v, self.scale, mask, self.softcap, self.get("sinks"))
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)

    def normed_qk(self, q, k):
        q_name, k_name = self.qk_norm_names
        return self[q_name](q), self[k_name](k)

    def query_scale(self, offset: int, length: int):
        """query_scaling's factor at positions offset... of a row, as a column: by the positions themselves, as
        transformers counts them from its cache's length (a packed row's examples each start a row of their own,
        ModelArgs.packs_by_example)."""
        beta, period, first = self.query_scaling
        positions = mx.arange(offset + first, offset + length + first, dtype=mx.float32)
        return (1 + beta * mx.log(1 + mx.floor(positions / period)))[:, None]


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up in one layer, gate rows first, if fused_gate_up (Phi-3, GLM: as
    gate_up_proj) or if names give both one name (Granite 4's shared_mlp: input_linear);
    down(act(up(x))) without a gate (Phi-2). The layers' names are the checkpoint's (names: gate, up, down); an
    activation with parameters (ACTIVATION_MODULES) is the module act_fn, as transformers names it; hidden and
    bias are the dense layers' (intermediate_size_mlp, else intermediate_size) and mlp_bias unless given (an
    expert's, a shared expert's)."""

    def __init__(self, args: ModelArgs, names=None, hidden=None, bias=None):
        super().__init__()
        dim = args.hidden_size
        hidden = hidden or args.intermediate_size_mlp or args.intermediate_size
        bias = args.mlp_bias if bias is None else bias
        self.gate, self.up, self.down = names or args.mlp_names
        self.gate_up = "gate_up_proj" if args.fused_gate_up else self.gate if self.gate == self.up else None
        if self.gate_up is not None:
            self[self.gate_up] = nn.Linear(dim, 2 * hidden, bias=bias)
        else:
            if self.gate is not None:
                self[self.gate] = nn.Linear(dim, hidden, bias=bias)
            self[self.up] = nn.Linear(dim, hidden, bias=bias)
        self[self.down] = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS.get(args.hidden_act)
        if self.act is None:
            self.act_fn = ACTIVATION_MODULES[args.hidden_act]()

    def __call__(self, x):
        act = self.act or self.act_fn
        if self.gate_up is not None:
            gate, up = mx.split(self[self.gate_up](x), 2, axis=-1)
            return self[self.down](act(gate) * up)
        if self.gate is None:
            return self[self.down](act(self[self.up](x)))
        return self[self.down](act(self[self.gate](x)) * self[self.up](x))


class AlwaysFrozen(set):
    """A module's frozen parameter names (MLX's Module._no_grad) that keep `names` through unfreeze(): for
    what transformers holds as buffers, saved with the weights but never trained."""

    def __init__(self, names):
        super().__init__(names)
        self.names = frozenset(names)

    def clear(self):
        super().clear()
        self.update(self.names)

    def difference_update(self, *others):
        super().difference_update(*(set(other) - self.names for other in others))


class XIELU(nn.Module):
    """xIELU (Huang and Schlag 2024), as transformers' XIELUActivation computes it: with a = softplus(alpha_p)
    and b = beta + softplus(alpha_n), a x^2 + beta x where x > 0, else (expm1(min(x, eps)) - x) b + beta x.
    Each MLP has its own: alpha_p and alpha_n are parameters, frozen unless the layer is fully fine-tuned;
    beta and eps are buffers in transformers, never trained. Initialised as transformers does; a checkpoint
    loads over it."""

    def __init__(self):
        super().__init__()
        self.alpha_p = mx.array([math.log(math.expm1(0.8))])
        self.alpha_n = mx.array([math.log(math.expm1(0.8 - 0.5))])
        self.beta = mx.array(0.5)
        self.eps = mx.array(-1e-6)
        self._no_grad = AlwaysFrozen(("beta", "eps"))

    def __call__(self, x):
        beta = self.beta.astype(x.dtype)
        positive = nn.softplus(self.alpha_p).astype(x.dtype) * x * x + beta * x
        negative = (mx.expm1(mx.minimum(x, self.eps.astype(x.dtype))) - x) * (
            beta + nn.softplus(self.alpha_n).astype(x.dtype)) + beta * x
        return mx.where(x > 0, positive, negative)


class SparseMoE(nn.Module):
    """A mixture of experts: each token goes through the num_experts_per_tok experts that its router's scores
    choose (routing), their outputs weighted; and, where the family has one, through a shared MLP too. Each
    part under the checkpoint's name (router_name, expert_names, router_bias, shared_expert). The experts are
    stacked (GatedExperts), each token's computed by its own alone, on the device: a step compiles."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        experts = args.num_local_experts
        self.top_k, self.routing, self.normalize = args.num_experts_per_tok, args.routing, args.norm_topk_prob
        self.groups, self.kept_groups, self.group_score_top = args.n_group, args.topk_group, args.group_score_top
        self.weight_scale, self.jitter = args.routed_scaling_factor, args.router_jitter_noise
        self.router_name, self.bias_name = args.router_name, None
        router = nn.Linear(args.hidden_size, experts, bias=False)
        if args.router_bias is not None:
            self.bias_name, axes = args.router_bias
            if self.bias_name.startswith(self.router_name + "."):
                router = Router(args.hidden_size, experts)
        set_path(self, self.router_name, router)
        if self.bias_name is not None:
            set_path(self, self.bias_name, mx.zeros((1,) * (axes - 1) + (experts,)))
        self.experts = GatedExperts(args)
        self.shared_name, self.shared_gate_name = args.shared_expert, args.shared_expert_gate
        if self.shared_name is not None:
            self[self.shared_name] = MLP(args, args.mlp_names, args.shared_expert_intermediate_size)
        if self.shared_gate_name is not None:
            self[self.shared_gate_name] = nn.Linear(args.hidden_size, 1, bias=False)

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        chosen, weights = self.route(x)
        y = (through_experts(self.experts, x, chosen) * weights[..., None]).sum(axis=-2)
        if self.shared_name is not None:
            shared = self[self.shared_name](x)
            if self.shared_gate_name is not None:
                shared = shared * mx.sigmoid(self[self.shared_gate_name](x))
            y = y + shared
        return y.reshape(shape)

    def route(self, x):
        """(chosen, weights): each token's experts and their weights, in x's type."""
        logits = at_path(self, self.router_name)(x).astype(mx.float32)
        if self.routing == "sparsemixer":
            chosen, weights = sparsemixer(logits, self.jitter)
            return chosen, weights.astype(x.dtype)
        # the softmax's order is the logits': they choose alike
        scores = mx.sigmoid(logits) if self.routing == "sigmoid" else logits
        choice = scores
        if self.bias_name is not None:  # a bias to the probabilities (or sigmoids), for choosing alone
            probabilities = scores if self.routing == "sigmoid" else mx.softmax(logits, axis=-1)
            choice = probabilities + at_path(self, self.bias_name).astype(mx.float32)
        if self.groups > 1:
            choice = in_best_groups(choice, self.groups, self.kept_groups, self.group_score_top)
        chosen = mx.stop_gradient(mx.argpartition(-choice, kth=self.top_k - 1, axis=-1)[:, :self.top_k])
        weights = mx.take_along_axis(scores, chosen, axis=-1)
        if self.routing == "softmax":  # the softmax of the chosen ones: the whole softmax's, normalized
            weights = (mx.softmax(weights, axis=-1) if self.normalize else
                       mx.take_along_axis(mx.softmax(logits, axis=-1), chosen, axis=-1))
        elif self.normalize:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        if self.weight_scale != 1.0:
            weights = weights * self.weight_scale
        return chosen, weights.astype(x.dtype)


def in_best_groups(scores, groups: int, kept: int, top: int = 2):
    """The scores with those outside the `kept` of `groups` groups of experts (in their order) whose `top` best
    scores sum highest at -inf (GLM-4.5's and DeepSeek V3's grouped choice: two; DeepSeek V2's: one)."""
    tokens, experts = scores.shape
    grouped = scores.reshape(tokens, groups, experts // groups)
    best = mx.argpartition(-mx.topk(grouped, top, axis=-1).sum(axis=-1), kth=kept - 1, axis=-1)[:, :kept]
    inside = mx.put_along_axis(mx.zeros((tokens, groups), dtype=mx.bool_), best, mx.array(True), axis=-1)
    return mx.where(inside[:, :, None], grouped, -mx.inf).reshape(tokens, experts)


def sparsemixer(scores, jitter: float):
    """Phi-3.5-MoE's router in eval mode: the best expert, then the best of the others; each weighted by the
    softmax over the experts left whose scores are within 2 * jitter (relative) of its own."""
    chosen, weights, left = [], [], scores
    for _ in range(2):
        best = mx.stop_gradient(mx.argmax(left, axis=-1, keepdims=True))
        top = mx.take_along_axis(left, best, axis=-1)
        far = mx.stop_gradient((top - scores) / mx.maximum(mx.abs(scores), top) > 2 * jitter)
        weights.append(mx.take_along_axis(mx.softmax(mx.where(far, -mx.inf, left), axis=-1), best, axis=-1))
        chosen.append(best)
        left = mx.put_along_axis(left, best, mx.array(-mx.inf), axis=-1)
    return mx.concatenate(chosen, axis=-1), mx.concatenate(weights, axis=-1)


def at_path(module: nn.Module, path: str):
    """module's descendant at a dotted path (gate.wg)."""
    for name in path.split("."):
        module = module[name]
    return module


def set_path(module: nn.Module, path: str, value):
    """Put value at a dotted path in module, with plain modules for the parts not there yet."""
    *parents, name = path.split(".")
    for part in parents:
        if part not in module:
            module[part] = nn.Module()
        module = module[part]
    module[name] = value


# The experts' weights stacked, one array per projection. Each token goes through its chosen experts alone, by
# mx.gather_mm: the routing stays on the device, so a training step compiles. SparseMoE's (ExpertsLinear), which
# checkpoints hold per expert, take adapters per expert and convert -q quantizes them (mx.gather_qmm). Those of
# the families whose checkpoints stack them (Granite MoE, gpt-oss, Llama 4, Gemma 4) are held as there: no
# nn.Linear, LoRA cannot target them (nor can PEFT's target_modules), and convert -q leaves them in float.


class Router(nn.Module):
    """A mixture of experts' score for each expert, x @ weight.T (+ bias), held as the checkpoint holds it, where
    the checkpoint's router is no linear layer (the stacked experts' families; GLM-4.5's, which holds its
    e_score_correction_bias too). No nn.Linear, so neither a LoRA target (PEFT cannot adapt these routers) nor
    quantized: its few numbers decide which experts run."""

    def __init__(self, dims: int, experts: int, bias=False):
        super().__init__()
        self.weight = mx.zeros((experts, dims))
        if bias:
            self.bias = mx.zeros((experts,))

    def __call__(self, x):
        scores = x @ self.weight.T
        return scores + self.bias if "bias" in self else scores


def top_k(scores, k: int):
    """(indices, scores) of the k highest scores of each row."""
    chosen = mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k])
    return chosen, mx.take_along_axis(scores, chosen, axis=-1)


def through_experts(expert, x, chosen):
    """[tokens, k, H]: each token x[t] (x [tokens, H]), or each x[t, j] (x [tokens, k, H]), through its chosen
    experts chosen[t, j], by expert(rows [..., 1, H], expert of each row, whether those are sorted)."""
    tokens, k = chosen.shape
    if chosen.size < 64:
        return expert(x[:, None, None] if x.ndim == 2 else x[:, :, None], chosen, False).squeeze(-2)
    # sorted by expert, gather_mm reads each expert's weights once for all its rows (mlx-lm's threshold)
    experts = chosen.reshape(-1)
    order = mx.argsort(experts)
    inverse = mx.argsort(order)
    # Its operands gathered as [n, 1, H] (the rows, and in the backward pass the outputs' gradient), never views
    # with that axis inserted: MLX 0.32.4's sorted gather_mm on CUDA misreads those.
    rows = mx.broadcast_to(x[:, None] if x.ndim == 2 else x, (tokens, k, x.shape[-1])).reshape(tokens * k, 1, -1)
    out = expert(permuted(rows, order, inverse), experts[order], True)
    return permuted(out, inverse, order).reshape(tokens, k, -1)


def softmax_routed(x, scores, k: int, expert):
    """The outputs of each token's k highest-scoring experts (through_experts), weighted by the softmax of those
    scores (computed in float32)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    chosen, top = top_k(scores(x).astype(mx.float32), k)
    weights = mx.softmax(top, axis=-1).astype(x.dtype)
    return (through_experts(expert, x, chosen) * weights[..., None]).sum(axis=-2).reshape(shape)


class StackedLinear(nn.Module):
    """One linear layer per expert, their weights stacked as nn.Linear's are: weight [experts, output, input]."""

    def __init__(self, experts: int, input_dims: int, output_dims: int):
        super().__init__()
        self.weight = mx.zeros((experts, output_dims, input_dims))

    def __call__(self, x, indices, sorted_indices: bool):
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)


class ExpertsLinear(StackedLinear):
    """A SparseMoE's layer, stacked over its experts (StackedLinear), which its checkpoint holds per expert
    (CheckpointNames.experts): LoRA can target each expert's (experts.{e}.P: linear_layers, ExpertsLoRA), and
    convert -q quantizes it (QuantizedExpertsLinear)."""


class QuantizedExpertsLinear(nn.Module):
    """ExpertsLinear quantized, as mlx-lm's QuantizedSwitchLinear holds it: weight, scales and biases stacked over
    the experts. mx.gather_qmm reads the experts of the rows alone: dequantizing every expert for a product
    (as QuantizedLinear does for many rows) would read them all."""

    @classmethod
    def from_linear(cls, linear: ExpertsLinear, group_size: int, bits: int):
        layer = cls()
        layer.weight, layer.scales, layer.biases = mx.quantize(linear.weight, group_size, bits)
        layer.group_size, layer.bits = group_size, bits
        layer.freeze()
        return layer

    def __call__(self, x, indices, sorted_indices: bool):
        return mx.gather_qmm(x, self.weight, self.scales, self.biases, rhs_indices=indices, transpose=True,
                             group_size=self.group_size, bits=self.bits, sorted_indices=sorted_indices)


EXPERT_LAYERS = (ExpertsLinear, QuantizedExpertsLinear)


class GatedExperts(nn.Module):
    """A SparseMoE's experts, each a gated MLP down(act(gate(x)) * up(x)), each of their layers stacked in one
    ExpertsLinear under the checkpoint's name (expert_names); through_experts' expert."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        experts, dims = args.num_local_experts, args.hidden_size
        hidden = args.moe_intermediate_size or args.intermediate_size
        self.gate, self.up, self.down = args.expert_names
        self[self.gate] = ExpertsLinear(experts, dims, hidden)
        self[self.up] = ExpertsLinear(experts, dims, hidden)
        self[self.down] = ExpertsLinear(experts, hidden, dims)
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, x, indices, sorted_indices: bool):
        gate, up = (self[name](x, indices, sorted_indices) for name in (self.gate, self.up))
        return self[self.down](self.act(gate) * up, indices, sorted_indices)


class GraniteMoE(nn.Module):
    """Granite MoE's mixture of experts (block_sparse_moe): softmax_routed over the router's scores (router.layer);
    each expert a gated MLP whose gate and up projections are one input_linear (gate rows first)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        experts, dims, hidden = args.num_local_experts, args.hidden_size, args.intermediate_size
        self.router = nn.Module()
        self.router.layer = Router(dims, experts)
        self.input_linear = StackedLinear(experts, dims, 2 * hidden)
        self.output_linear = StackedLinear(experts, hidden, dims)
        self.top_k, self.act = args.num_experts_per_tok, ACTIVATIONS[args.hidden_act]

    def __call__(self, x):
        return softmax_routed(x, self.router.layer, self.top_k, self.expert)

    def expert(self, x, indices, sorted_indices: bool):
        gate, up = mx.split(self.input_linear(x, indices, sorted_indices), 2, axis=-1)
        return self.output_linear(self.act(gate) * up, indices, sorted_indices)


class StackedExperts(nn.Module):
    """Gated MLP experts as transformers holds Llama 4's: gate_up_proj [experts, H, 2 I] and down_proj
    [experts, I, H], multiplied from the right (x @ w[e]), and gate_up_proj_bias and down_proj_bias if bias;
    act(gate) * up, gate and up the two halves of gate_up's output."""

    def __init__(self, args: ModelArgs, bias=False):
        super().__init__()
        experts, dims, hidden = args.num_local_experts, args.hidden_size, args.intermediate_size
        self.gate_up_proj = mx.zeros((experts, dims, 2 * hidden))
        self.down_proj = mx.zeros((experts, hidden, dims))
        if bias:
            self.gate_up_proj_bias = mx.zeros((experts, 2 * hidden))
            self.down_proj_bias = mx.zeros((experts, dims))
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, x, indices, sorted_indices: bool):
        """through_experts' expert."""
        h = self.gated(self.product(x, "gate_up_proj", indices, sorted_indices))
        return self.product(h, "down_proj", indices, sorted_indices)

    def product(self, x, name: str, indices, sorted_indices: bool):
        y = mx.gather_mm(x, self[name], rhs_indices=indices, sorted_indices=sorted_indices)
        bias = self.get(f"{name}_bias")
        return y if bias is None else y + mx.expand_dims(bias[indices], -2)

    def gated(self, gate_up):
        gate, up = mx.split(gate_up, 2, axis=-1)
        return self.act(gate) * up


class GptOssExperts(StackedExperts):
    """gpt-oss's: with biases, gate and up interleaved (the even and odd features of gate_up's output), and a
    clamped SwiGLU, (up + 1) * gate * sigmoid(swiglu_alpha * gate), gate clipped above at swiglu_limit and up
    to [-swiglu_limit, swiglu_limit]."""

    def __init__(self, args: ModelArgs):
        super().__init__(args, bias=True)
        self.alpha, self.limit = args.swiglu_alpha, args.swiglu_limit

    def gated(self, gate_up):
        gate = mx.minimum(gate_up[..., ::2], self.limit)
        up = mx.clip(gate_up[..., 1::2], -self.limit, self.limit)
        return (up + 1) * silu(self.alpha * gate) / self.alpha  # silu(a g) / a = g sigmoid(a g)


class GptOssMoE(nn.Module):
    """gpt-oss's mixture of experts (mlp): softmax_routed over the router's scores, which have a bias."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.router = Router(args.hidden_size, args.num_local_experts, bias=True)
        self.experts = GptOssExperts(args)
        self.top_k = args.num_experts_per_tok

    def __call__(self, x):
        return softmax_routed(x, self.router, self.top_k, self.experts)


class Llama4MoE(nn.Module):
    """Llama 4's mixture of experts (feed_forward): a shared expert every token goes through, plus each token's
    num_experts_per_tok highest-scoring experts, whose input (not output) is scaled by the sigmoid of the score."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.router = Router(args.hidden_size, args.num_local_experts)
        self.experts = StackedExperts(args)
        self.shared_expert = MLP(args, hidden=args.intermediate_size)
        self.top_k = args.num_experts_per_tok

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        chosen, top = top_k(self.router(x), self.top_k)
        gates = mx.sigmoid(top.astype(mx.float32)).astype(x.dtype)
        routed = through_experts(self.experts, x[:, None] * gates[..., None], chosen).sum(axis=-2)
        return (self.shared_expert(x) + routed).reshape(shape)


def norm(args: ModelArgs, dims: Optional[int] = None):
    dims = dims or args.hidden_size
    if args.norm in ("layer", "layer_no_bias"):
        return nn.LayerNorm(dims, eps=args.layer_norm_eps, bias=args.norm == "layer")
    return (OffsetRMSNorm if args.norm == "rms_offset" else nn.RMSNorm)(dims, eps=args.rms_norm_eps)


class OffsetRMSNorm(nn.RMSNorm):
    """Gemma's RMSNorm, which scales by 1 + weight."""

    def __call__(self, x):
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class EachHeadLayerNorm(nn.Module):
    """LayerNorm without bias over each head's features, each head with its own weights (Cohere's q/k norms):
    the input's last two axes are heads x features."""

    def __init__(self, heads: int, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((heads, dims))
        self.eps = eps

    def __call__(self, x):
        return self.weight * mx.fast.layer_norm(x, None, None, self.eps)


class DecoderLayer(nn.Module):
    """Attention then the feed-forward block (or both side by side, if parallel: on one norm's output, or each on
    its own norm's where block_norms names one before the feed-forward block), each with the norms of
    block_norms around it, each joining the residual stream times residual_scale. The feed-forward block is the
    MLP, or in the layers of moe_layers the mixture of experts of kind `mlp` (FEED_FORWARD), under the
    checkpoint's names for them (mlp_module, moe_module). The attention block is of class `attention`."""

    def __init__(self, args: ModelArgs, layer: int, attention=Attention):
        super().__init__()
        self.attention_name = args.attention_module
        self[self.attention_name] = attention(args, layer)
        moe = args.mlp != "gated" and (args.moe_layers is None or args.moe_layers[layer])
        self.feed_forward_name = args.moe_module if moe else args.mlp_module
        self[self.feed_forward_name] = FEED_FORWARD[args.mlp if moe else "gated"](args)
        self.norms = args.block_norms
        for name in self.norms:
            if name is not None:
                self[name] = norm(args)
        self.parallel, self.residual_scale = args.parallel, args.residual_scale

    def normed(self, k: int, x):
        return x if self.norms[k] is None else self[self.norms[k]](x)

    def __call__(self, x, mask, cache=None, example_rows=None):
        feed_forward = self[self.feed_forward_name]
        h = self.normed(0, x)
        out = self.normed(1, self[self.attention_name](h, mask, cache, example_rows))
        if self.parallel:
            return x + self.scaled(out + feed_forward(h if self.norms[2] is None else self.normed(2, x)))
        h = x + self.scaled(out)
        return h + self.scaled(self.normed(3, feed_forward(self.normed(2, h))))

    def scaled(self, x):
        return x if self.residual_scale == 1.0 else x * self.residual_scale


class StateMixerLayer(DecoderLayer):
    """DecoderLayer whose attention block is, in the layers of type `state_type`, a block that carries a state
    along the row (of class `mixer`, under the checkpoint's name `mixer_name`), kept in a StateCache in generation;
    attention, with its KVCache, in the others."""
    state_type: str
    mixer_name: str
    mixer: type

    def __init__(self, args: ModelArgs, layer: int):
        if args.layer_type(layer) != self.state_type:
            super().__init__(args, layer)
        else:
            super().__init__(replace(args, attention_module=self.mixer_name), layer, lambda args, _: self.mixer(args))

    def make_cache(self):
        return StateCache() if self.attention_name == self.mixer_name else KVCache()


# ModelArgs.mlp: the feed-forward block's class
FEED_FORWARD = {"gated": MLP, "sparse_moe": SparseMoE, "granite_moe": GraniteMoE, "gpt_oss_moe": GptOssMoE,
                "llama4_moe": Llama4MoE}


class DecoderStack(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        layer_class = globals()[args.family.layer] if args.family.layer else DecoderLayer
        self.layers = [layer_class(args, i) for i in range(args.num_hidden_layers)]
        self[args.final_norm] = norm(args)


def recomputed(fun):
    """fun(*arrays) (an array or a tuple of them), keeping none of its activations for the backward pass, where
    they are computed again once the cotangents reach it (in_chunks: in turn). mx.checkpoint's recomputation waits
    only for the forward's outputs, so that MLX may run every checkpointed function's at the start of the backward
    pass, all of their activations held at once."""
    @mx.custom_function
    def run(*arrays):
        return fun(*arrays)

    @run.vjp
    def run_vjp(primals, cotangents, outputs):
        primals, cotangents = ([*a] if isinstance(a, (list, tuple)) else [a] for a in (primals, cotangents))
        vjps = mx.vjp(fun, mx.depends(primals, cotangents), cotangents)[1]
        return tuple(vjps) if len(vjps) > 1 else vjps[0]

    return run


def in_chunks(chunk, x, size: int, model=None):
    """x's rows `size` at a time through chunk(i) (a function of the rows from row i on, giving an array, or a
    tuple of them, of a value a row), each output concatenated; each chunk but the last recomputed in the backward
    pass (recomputed). A chunk starts once the previous one's output exists, and is recomputed once the next one's
    gradient does, through a term times zero (so an output that is not finite reaches the next ones): MLX would
    otherwise run every chunk's largest step (a chunk of logits) at once, and hold them all. The trainable
    parameters of `model`'s output layer (Model.output_layers), which the chunks read, go through the
    recomputation as its inputs: a recomputed function gives no gradient to the arrays it reads otherwise."""
    found = dict(tree_flatten(model.trainable_parameters())) if model is not None else {}
    names = [name for name in found if name.startswith(model.output_layers())]
    outputs, starts = [], range(0, x.shape[0], size)
    for i in starts:
        part = x[i:i + size]
        if outputs:
            part = part + (0 * outputs[-1][0][:1]).astype(part.dtype)

        def call(rows, *values, losses=chunk(i)):
            if values:
                model.update(tree_unflatten(list(zip(names, values))))
            return losses(rows)

        out = (call if i == starts[-1] else recomputed(call))(part, *(found[name] for name in names))
        outputs.append(out if isinstance(out, tuple) else (out,))
    joined = tuple(mx.concatenate(parts) for parts in zip(*outputs))
    return joined if len(joined) > 1 else joined[0]


def checkpointed(layer: nn.Module, mask, example_rows):
    """layer(h, ...) as a function of (its trainable parameters, h) that keeps none of its activations for the
    backward pass, where they are computed again: memory for compute. (mx.checkpoint, not recomputed: what flows
    between some families' layers is more than an array, Gemma 4's.)"""
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
        elif args.lm_head_bias:  # the output layer's weight is the embedding's, its bias its own (ERNIE 4.5)
            self.lm_head = nn.Module()
            self.lm_head.bias = mx.zeros((args.vocab_size,))
        # each layer's mask: (sliding window, chunk), None where it has none
        self._layer_masks = [(args.sliding_window if args.layer_type(i) == "sliding_attention" else None,
                              args.attention_chunk_size if args.layer_type(i) == "chunked_attention" else None)
                             for i in range(args.num_hidden_layers)]
        self._alibi_slopes = alibi_slopes(args.num_attention_heads) if args.alibi else None
        self.grad_checkpoint = False  # recompute each layer's activations in the backward pass (checkpointed)
        # While set (lora.frozen_layers_cached), the inputs are rows of its states, not token ids.
        self.frozen_prefix: Optional[FrozenPrefix] = None

    @property
    def layers(self):
        return self.model.layers

    def keep(self, weights: dict):
        """Hold the weights named kept.* (CheckpointNames.kept: an image encoder, which this decoder does not use)
        as parameters, so that they are written back with the model."""
        def modules(tree):  # nested modules rather than dicts, so that freezing reaches every array
            if isinstance(tree, list):
                return [modules(v) for v in tree]
            if not isinstance(tree, dict):
                return tree
            module = nn.Module()
            for key, value in tree.items():
                module[key] = modules(value)
            return module

        kept = [(k[len(KEPT) + 1:], v) for k, v in weights.items() if k.startswith(f"{KEPT}.")]
        if kept:
            self[KEPT] = modules(tree_unflatten(kept))

    def hidden_states(self, inputs, cache=None, packing=None):
        """The final normed hidden states of `inputs` (token ids, or rows of frozen_prefix's states); `cache`
        is a list of KVCache, one per layer, or None; `packing` says where the examples of a packed row are
        (packed_layout). What flows from layer to layer (the stream) is the hidden states here; a subclass's
        may hold more (hidden)."""
        h, first = self.first_states(inputs)
        return self.normed(self.hidden(self.run_layers(h, first, len(self.layers), cache, packing)))

    def first_states(self, inputs):
        """(h, first): the hidden states of `inputs` entering the first decoder layer computed, and its number:
        the embeddings of token ids, or the states of rows of frozen_prefix."""
        if self.frozen_prefix is None:
            return self.embed(inputs), 0
        return self.frozen_prefix.states[inputs], self.frozen_prefix.layer

    @staticmethod
    def hidden(stream):
        """The hidden states in what flows between the decoder layers."""
        return stream

    def normed(self, h):
        """The final norm of the last layer's output hidden states."""
        return self.model[self.args.final_norm](h)

    def embed(self, inputs):
        h = self.model.embed_tokens(inputs)
        if self.args.embedding_scale is not None:  # rounded to the embeddings' type first, as transformers does
            h = h * mx.array(self.args.embedding_scale, dtype=h.dtype)
        return h

    def run_layers(self, h, start, stop, cache=None, packing=None):
        """The hidden states h entering decoder layer number `start` through the layers up to `stop`."""
        offset = cache[0].offset if cache else 0
        kinds = self._layer_masks[start:stop]
        packing = packing or {}
        example_rows = packing if "slots" in packing else None
        if example_rows:  # attention sees one example a row (training: no cache, offset 0)
            length = packing["slots"].shape[1]
            masks = {m: attention_mask(length, 0, m[0], chunk=m[1]) for m in set(kinds)}
        else:
            length = self.hidden(h).shape[1]
            masks = {m: attention_mask(length, offset, m[0], packing.get("examples"), m[1]) for m in set(kinds)}
        if self._alibi_slopes is not None:
            masks = {m: alibi_mask(mask, self._alibi_slopes, length, offset, self.args.head_dim, h.dtype,
                                   None if example_rows else packing.get("examples")) for m, mask in masks.items()}
        caches = cache[start:stop] if cache else [None] * len(kinds)
        for layer, kind, layer_cache in zip(self.layers[start:stop], kinds, caches):
            if self.grad_checkpoint and cache is None:
                h = checkpointed(layer, masks[kind], example_rows)(layer.trainable_parameters(), h)
            else:
                h = layer(h, masks[kind], layer_cache, example_rows)
        return h

    def output_layers(self) -> tuple:
        """The paths (as prefixes of parameter names) of what logits() computes with: the output layer, or the
        embedding it is tied to and its own bias."""
        return ("model.embed_tokens.", "lm_head.") if self.args.tie_word_embeddings else ("lm_head.",)

    def logits(self, h):
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
            if self.args.lm_head_bias:
                logits = logits + self.lm_head.bias
        else:
            logits = self.lm_head(h)
        if self.args.logits_scale != 1.0:
            logits = logits * self.args.logits_scale
        cap = self.args.final_logit_softcapping
        return logits if cap is None else mx.tanh(logits / cap) * cap

    def __call__(self, inputs, cache=None, packing=None):
        return self.logits(self.hidden_states(inputs, cache, packing))

    def make_cache(self):
        """Each layer's cache for generation: its own kind where it has one (make_cache), else a KVCache."""
        return [layer.make_cache() if hasattr(layer, "make_cache") else KVCache() for layer in self.layers]


def make_model(args: ModelArgs) -> Model:
    """The model `args` describe: a Model, or its family's own kind of Model (Family.model)."""
    return globals()[args.family.model](args) if args.family.model else Model(args)


# DeepSeek V2, V3: multi-head latent attention


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek V2, V3). Each head's query (q_proj, or through the q_lora_rank bottleneck
    q_a_proj, q_a_layernorm, q_b_proj) has qk_nope_head_dim features without rope and qk_rope_head_dim with it;
    kv_a_proj_with_mqa gives a latent of kv_lora_rank features (normed by kv_a_layernorm) and the key's features
    with rope, one set that every head shares; kv_b_proj expands the latent into each head's key features without
    rope and its value (v_head_dim). Scores are scaled by 1 / sqrt(the query's features) times yarn's mscale of
    mscale_all_dim squared.

    The KV cache holds the latent and the rotated key features, as transformers' does: kv_lora_rank +
    qk_rope_head_dim numbers a position, where whole keys and values would take heads * (qk head size + v_head_dim)
    (71 times as many in DeepSeek-V3). A prompt expands the latent into keys and values; a token generated alone
    attends in the latent's space instead (its query's features without rope taken through kv_b_proj's key part,
    the weighted latent through its value part), which reads the cache once rather than expanding all of it."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        dim, self.n_heads = args.hidden_size, args.num_attention_heads
        self.nope, self.rope_dims, self.rank = args.qk_nope_head_dim, args.qk_rope_head_dim, args.kv_lora_rank
        q_dims = self.n_heads * (self.nope + self.rope_dims)
        # transformers norms the two latents with its RMSNorm's default eps, whatever rms_norm_eps says
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, q_dims, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = nn.RMSNorm(args.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(args.q_lora_rank, q_dims, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.rank + self.rope_dims, bias=args.attention_bias)
        self.kv_a_layernorm = nn.RMSNorm(self.rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.nope + args.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * args.v_head_dim, dim, bias=args.attention_bias)
        rope = args.rope_for(layer)
        self.rope = RoPE(args, rope, self.rope_dims)
        self.scale = (self.nope + self.rope_dims) ** -0.5
        if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
            self.scale *= yarn_mscale(rope.get("factor") or 1.0, rope["mscale_all_dim"]) ** 2

    def __call__(self, x, mask, cache=None, example_rows=None):
        if example_rows is not None:
            return in_example_rows(lambda rows: self(rows, mask, cache), x, example_rows)
        B, L, _ = x.shape
        q = self.q_proj(x) if "q_proj" in self else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = mx.split(q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3), [self.nope], axis=-1)
        latent, k_rot = mx.split(self.kv_a_proj_with_mqa(x)[:, None], [self.rank], axis=-1)
        latent = self.kv_a_layernorm(latent)
        offset = cache.offset if cache is not None else 0
        q_rot, k_rot = self.rope(q_rot, offset), self.rope(k_rot, offset)
        if cache is not None:
            latent, k_rot = cache.update(latent, k_rot)
        if cache is not None and L == 1:
            weight = linear_weight(self.kv_b_proj).astype(q.dtype).reshape(self.n_heads, -1, self.rank)
            k_weight, v_weight = weight[:, :self.nope], weight[:, self.nope:]
            q = mx.concatenate([q_nope @ k_weight, q_rot], axis=-1)
            out = attention(q, mx.concatenate([latent, k_rot], axis=-1), latent, self.scale, mask)
            out = out @ v_weight.swapaxes(-1, -2)
        else:
            T = latent.shape[2]
            kv = self.kv_b_proj(latent[:, 0]).reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)
            k_nope, v = mx.split(kv, [self.nope], axis=-1)
            k = mx.concatenate([k_nope, mx.broadcast_to(k_rot, (B, self.n_heads, T, self.rope_dims))], axis=-1)
            out = attention(mx.concatenate([q_nope, q_rot], axis=-1), k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class LatentAttentionLayer(DecoderLayer):
    """DecoderLayer with LatentAttention."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer, LatentAttention)


def linear_weight(layer):
    """The weight [output, input] that a linear layer without bias multiplies its input by: an adapted one's merged
    weight (LoRALinear's, DoRALinear's), a quantized one's dequantized."""
    if isinstance(layer, LoRALinear):
        return layer.merged_weight()
    if isinstance(layer, nn.QuantizedLinear):
        return dequantized_weight(layer, layer.scales.dtype)
    return layer.weight


# Gemma 4: its own forward path


class Gemma4Attention(nn.Module):
    """Gemma 4's attention: queries and keys normed per head, values per head without a weight, the scores
    unscaled (the norms stand for the scale), each layer with its own head size and K/V heads. The full layers
    of attention_k_eq_v take their values from the keys' projection, before its norm and rope. A "reuse" layer
    (kv_sharing) has queries alone and attends to the K/V that the last earlier layer of its type ("store")
    left in the stream; with a KV cache that is the whole cached sequence, so it writes none of its own."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.layer_kv_heads[layer]
        self.head_dim, self.layer_type = args.layer_head_dims[layer], args.layer_type(layer)
        self.sharing = args.kv_sharing[layer] if args.kv_sharing else None
        dim, q_dims, kv_dims, bias = (args.hidden_size, self.n_heads * self.head_dim,
                                      self.n_kv_heads * self.head_dim, args.attention_bias)
        self.q_proj = nn.Linear(dim, q_dims, bias=bias)
        if self.sharing != "reuse":
            self.k_proj = nn.Linear(dim, kv_dims, bias=bias)
            if not (args.attention_k_eq_v and self.layer_type == "full_attention"):
                self.v_proj = nn.Linear(dim, kv_dims, bias=bias)
            self.k_norm = norm(args, self.head_dim)
        self.o_proj = nn.Linear(q_dims, dim, bias=bias)
        self.q_norm = norm(args, self.head_dim)
        self.rope = RoPE(args, args.rope_for(layer), self.head_dim)
        self.eps = args.rms_norm_eps

    def __call__(self, x, mask, cache, example_rows, inputs: dict):
        """(output, inputs): `inputs` are the stream's (Gemma4DecoderLayer), given back with this layer's K/V
        under its type where it stores them."""
        kv = []
        if self.sharing != "reuse":
            k = self.k_proj(x)
            kv = [k, self.v_proj(x) if "v_proj" in self else k]
        if example_rows is None:
            out, inputs = self.attend(self.q_proj(x), kv, mask, cache, inputs)
            return self.o_proj(out), inputs
        slots, order = example_rows["slots"], example_rows["order"]
        index = slots.reshape(-1)
        q, *kv = (permuted(y[0], index, order).reshape(*slots.shape, -1) for y in [self.q_proj(x), *kv])
        out, inputs = self.attend(q, kv, mask, cache, inputs)
        return self.o_proj(permuted(out.reshape(-1, out.shape[-1]), order, index)[None]), inputs

    def attend(self, q, kv, mask, cache, inputs):
        B, L, _ = q.shape
        q = self.q_norm(q.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        if self.sharing == "reuse":
            k, v = inputs[self.layer_type]
        else:
            k, v = (y.reshape(B, L, self.n_kv_heads, -1) for y in kv)
            k = self.rope(self.k_norm(k).transpose(0, 2, 1, 3), cache.offset if cache is not None else 0)
            v = mx.fast.rms_norm(v, None, self.eps).transpose(0, 2, 1, 3)
            if cache is not None:
                k, v = cache.update(k, v)
            if self.sharing == "store":
                inputs = {**inputs, self.layer_type: (k, v)}
        q = self.rope(q, k.shape[2] - L)  # the keys end at the queries' last position
        out = attention(q, k, v, 1.0, mask)
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1), inputs


class Gemma4DecoderLayer(nn.Module):
    """Attention and the MLP each between two norms (as Gemma 2's); then, with per-layer embeddings,
    per_layer_projection(act(per_layer_input_gate(h)) * the layer's own embedding), normed, joins the stream;
    last, the whole stream is multiplied by layer_scalar. What flows between layers is (hidden states,
    {"per_layer": the per-layer embeddings, a layer type: the K/V its store layer left}) (Gemma4Model)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.index = layer
        self.self_attn = Gemma4Attention(args, layer)
        self.mlp = MLP(replace(args, intermediate_size=args.layer_intermediate_sizes[layer]))
        for name in GEMMA2["block_norms"]:
            self[name] = norm(args)
        size = args.hidden_size_per_layer_input
        if size:
            self.per_layer_input_gate = nn.Linear(args.hidden_size, size, bias=False)
            self.per_layer_projection = nn.Linear(size, args.hidden_size, bias=False)
            self.post_per_layer_input_norm = norm(args)
            self.act = ACTIVATIONS[args.hidden_act]
        if args.num_local_experts:
            self.router = Gemma4Router(args)
            self.experts = Gemma4Experts(args)
            for name in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                         "post_feedforward_layernorm_2"):
                self[name] = norm(args)
        self.layer_scalar = mx.ones((1,))
        self._no_grad = AlwaysFrozen(("layer_scalar",))  # a buffer in transformers

    def __call__(self, stream, mask, cache=None, example_rows=None):
        x, inputs = stream
        out, inputs = self.self_attn(self.input_layernorm(x), mask, cache, example_rows, inputs)
        h = x + self.post_attention_layernorm(out)
        feed_forward = self.mlp(self.pre_feedforward_layernorm(h))
        if "router" in self:  # the experts beside the MLP, routed by the stream before its norm
            flat = h.reshape(-1, h.shape[-1])
            chosen, weights = self.router(flat)
            routed = through_experts(self.experts, self.pre_feedforward_layernorm_2(flat), chosen)
            experts = (routed * weights[..., None]).sum(axis=-2).astype(h.dtype).reshape(h.shape)
            feed_forward = self.post_feedforward_layernorm_1(feed_forward) + self.post_feedforward_layernorm_2(experts)
        h = h + self.post_feedforward_layernorm(feed_forward)
        if "per_layer" in inputs:
            gate = self.act(self.per_layer_input_gate(h)) * inputs["per_layer"][:, :, self.index]
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return h * self.layer_scalar, inputs


class Gemma4Router(nn.Module):
    """Each token's top_k experts by the softmax of proj(rms_norm(x) * scale / sqrt(hidden_size)), their
    probabilities renormalized to sum 1, then times per_expert_scale: (experts, weights)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.eps = args.num_experts_per_tok, args.rms_norm_eps
        self.proj = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_local_experts,))

    def __call__(self, x):
        x = mx.fast.rms_norm(x, None, self.eps) * self.scale * x.shape[-1] ** -0.5
        chosen, weights = top_k(mx.softmax(self.proj(x).astype(mx.float32), axis=-1), self.top_k)
        return chosen, weights / weights.sum(axis=-1, keepdims=True) * self.per_expert_scale[chosen]


class Gemma4Experts(nn.Module):
    """The experts' gated MLPs, stacked as the checkpoint holds them (as nn.Linear's weights): gate and up in
    gate_up_proj [experts, 2 moe_intermediate_size, hidden], down_proj [experts, hidden, moe_intermediate_size]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        experts, width = args.num_local_experts, args.moe_intermediate_size
        self.gate_up_proj = mx.zeros((experts, 2 * width, args.hidden_size))
        self.down_proj = mx.zeros((experts, args.hidden_size, width))
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, x, indices, sorted_indices: bool):
        """through_experts' expert."""
        gate, up = mx.split(self.product(x, self.gate_up_proj, indices, sorted_indices), 2, axis=-1)
        return self.product(self.act(gate) * up, self.down_proj, indices, sorted_indices)

    @staticmethod
    def product(x, weight, indices, sorted_indices: bool):
        return mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)


class Gemma4Model(Model):
    """With per-layer embeddings (hidden_size_per_layer_input P), each layer also reads its part of
    (norm(per_layer_model_projection(E) / sqrt(hidden_size)) + embed_tokens_per_layer(ids) * sqrt(P)) / sqrt(2),
    E being the scaled token embeddings, the norm over each layer's P features. What flows between the layers
    is Gemma4DecoderLayer's stream."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        size, decoder = args.hidden_size_per_layer_input, self.model
        if size:
            decoder.embed_tokens_per_layer = nn.Embedding(args.vocab_size_per_layer_input,
                                                        args.num_hidden_layers * size)
            decoder.per_layer_model_projection = nn.Linear(args.hidden_size, args.num_hidden_layers * size, bias=False)
            decoder.per_layer_projection_norm = norm(args, size)

    @staticmethod
    def hidden(stream):
        return stream[0]

    def first_states(self, inputs):
        h = self.embed(inputs)
        size, decoder = self.args.hidden_size_per_layer_input, self.model
        if not size:
            return (h, {}), 0
        shape = (*inputs.shape, self.args.num_hidden_layers, size)
        tokens = decoder.embed_tokens_per_layer(inputs)
        tokens = tokens * mx.array(size ** 0.5, dtype=tokens.dtype)  # rounded to their type, as transformers does
        context = decoder.per_layer_model_projection(h) * self.args.hidden_size ** -0.5
        per_layer = (decoder.per_layer_projection_norm(context.reshape(shape)) + tokens.reshape(shape)) * 2 ** -0.5
        return (h, {"per_layer": per_layer}), 0


# LFM2: its own decoder layer


class ShortConv(nn.Module):
    """LFM2's short convolution: in_proj's output in three parts B, C and x; C times the causal depthwise
    convolution (conv, a CausalConv1d) of B * x over its last conv_L_cache positions; then out_proj. What it
    carries along the row is the convolution's last taps - 1 inputs: zeros at the start of a row (of each packed
    example: example_rows) and of a generation, whose StateCache keeps them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dims, bias = args.hidden_size, args.conv_bias
        self.in_proj = nn.Linear(dims, 3 * dims, bias=bias)
        self.out_proj = nn.Linear(dims, dims, bias=bias)
        self.conv = CausalConv1d(dims, args.conv_L_cache, bias)

    def __call__(self, x, mask, cache=None, example_rows=None):
        b, c, x = mx.split(self.in_proj(x), 3, axis=-1)
        if example_rows is not None:
            return self.out_proj(c * in_example_rows(self.convolved, b * x, example_rows))
        return self.out_proj(c * self.convolved(b * x, cache))

    def convolved(self, x, cache=None):
        out, state = self.conv(x, cache.states.get("conv") if cache is not None else None)
        if cache is not None:
            cache.states["conv"] = state
            cache.offset += x.shape[1]
        return out


class Lfm2DecoderLayer(StateMixerLayer):
    """LFM2's decoder layer: a short convolution (conv) where layer_types says conv, else attention (self_attn);
    then the feed-forward block (feed_forward: the MLP, or in the layers of moe_layers the mixture of experts),
    each after its norm (operator_norm, ffn_norm) and joining the residual stream."""
    state_type, mixer_name, mixer = "conv", "conv", ShortConv

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, layer)
        if args.mlp != "gated" and args.moe_layers[layer]:
            # transformers' router is no linear layer, which PEFT cannot adapt: nor is it a LoRA target here
            self[self.feed_forward_name].gate = Router(args.hidden_size, args.num_local_experts)


# Qwen3-Next and Qwen3.5: gated delta-rule linear attention beside gated softmax attention


class GatedDeltaNet(nn.Module):
    """Qwen3-Next's and Qwen3.5's linear attention (linear_attn), as transformers' GatedDeltaNet computes it: the
    input projected to queries, keys and values (q, k, v; in_proj_qkv, or with z in_proj_qkvz grouped by key head),
    the output gate z (in_proj_z), and per value head beta (in_proj_b) and the decay's input a (in_proj_a; or both in
    in_proj_ba); q, k and v through a causal depthwise convolution (conv1d, whose last inputs are a state) and the
    activation; queries and keys normed to length 1 (queries then scaled by 1/sqrt(head size)); then the gated
    delta rule, a state S [key features, value features] per value head that decays by exp(g), g = -exp(A_log) *
    softplus(a + dt_bias), and learns each v at its k at the rate sigmoid(b): out = S q (gated_delta_chunked,
    gated_delta_step); out normed per head (norm), times silu(z), through out_proj. Each value head reads the keys
    and queries of key head (its number) // (value heads / key heads)."""

    chunk_size = 64  # positions of gated_delta_chunked's chunks: a power of 2 (a test sets it small)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.key_heads, self.value_heads = args.linear_num_key_heads, args.linear_num_value_heads
        self.key_dim, self.value_dim = args.linear_key_head_dim, args.linear_value_head_dim
        dim, keys, values = args.hidden_size, self.key_heads * self.key_dim, self.value_heads * self.value_dim
        self.fused = args.linear_fused_projections
        if self.fused:
            self.in_proj_qkvz = nn.Linear(dim, 2 * keys + 2 * values, bias=False)
            self.in_proj_ba = nn.Linear(dim, 2 * self.value_heads, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(dim, 2 * keys + values, bias=False)
            self.in_proj_z = nn.Linear(dim, values, bias=False)
            self.in_proj_b = nn.Linear(dim, self.value_heads, bias=False)
            self.in_proj_a = nn.Linear(dim, self.value_heads, bias=False)
        self.conv1d = CausalConv1d(2 * keys + values, args.linear_conv_kernel_dim, bias=False)
        self.dt_bias = mx.ones((self.value_heads,))
        self.A_log = mx.zeros((self.value_heads,))
        self.norm = nn.RMSNorm(self.value_dim, eps=args.rms_norm_eps)
        self.out_proj = nn.Linear(values, dim, bias=False)
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, x, mask, cache=None, example_rows=None):
        """mask: unused (each position reads the state of those before it); example_rows: a packed row's {"slots",
        "order"} (packed_layout), for each example's state to start at zero."""
        if example_rows is not None:
            return in_example_rows(lambda rows: self(rows, mask, cache), x, example_rows)
        B, L, _ = x.shape
        qkv, z, b, a = self.projections(x)
        states = cache.states if cache is not None else {}
        qkv, conv_state = self.conv1d(qkv, states.get("conv"))
        qkv = self.act(qkv)
        keys = self.key_heads * self.key_dim
        q, k, v = mx.split(qkv, [keys, 2 * keys], axis=-1)
        repeats = self.value_heads // self.key_heads
        # normed to length 1: rms_norm over d features is x / sqrt(mean(x^2) + eps / d) = sqrt(d) l2norm(x)
        q, k = (mx.repeat(mx.fast.rms_norm(y.reshape(B, L, self.key_heads, -1).astype(mx.float32), None,
                                           1e-6 / self.key_dim), repeats, axis=2) for y in (q, k))
        q = q / self.key_dim
        k = k / self.key_dim ** 0.5
        v = v.reshape(B, L, self.value_heads, -1)
        beta = mx.sigmoid(b.astype(mx.float32))
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + self.dt_bias.astype(mx.float32))
        state = states.get("recurrent")
        if state is not None and L == 1:
            out, state = gated_delta_step(q, k, v, g, beta, state)
        else:
            out, state = gated_delta_chunked(q, k, v, g, beta, state, self.chunk_size)
        if cache is not None:
            cache.states = {"conv": conv_state, "recurrent": state}
            cache.offset += L
        out = self.norm(out.astype(x.dtype)) * silu(z.reshape(B, L, self.value_heads, -1).astype(mx.float32))
        return self.out_proj(out.astype(x.dtype).reshape(B, L, -1))

    def projections(self, x):
        """(q, k and v side by side, z, b, a) of the input."""
        if not self.fused:
            return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        # by key head: its queries, keys, values and z, then its value heads' b and a
        B, L, _ = x.shape
        groups = self.value_heads // self.key_heads
        qkvz = self.in_proj_qkvz(x).reshape(B, L, self.key_heads, -1)
        q, k, v, z = mx.split(qkvz, np.cumsum([self.key_dim, self.key_dim, groups * self.value_dim]).tolist(), axis=-1)
        b, a = mx.split(self.in_proj_ba(x).reshape(B, L, self.key_heads, -1), 2, axis=-1)
        return (mx.concatenate([y.reshape(B, L, -1) for y in (q, k, v)], axis=-1), z,
                b.reshape(B, L, -1), a.reshape(B, L, -1))


def gated_delta_step(q, k, v, g, beta, state):
    """The gated delta rule for one position: q, k [B, 1, H, Dk], v [B, 1, H, Dv], g, beta [B, 1, H], state [B, H,
    Dk, Dv] -> (out [B, 1, H, Dv], state), in float32. The state decays by exp(g), then learns v at k: S += k (v -
    S^T k) beta; out = S^T q."""
    q, k, v = (y[:, 0].astype(mx.float32) for y in (q, k, v))
    state = state * mx.exp(g[:, 0])[..., None, None]
    delta = (v - (k[..., None, :] @ state)[..., 0, :]) * beta[:, 0, :, None]
    state = state + k[..., :, None] * delta[..., None, :]
    return (q[..., None, :] @ state)[:, None, :, 0], state


def gated_delta_chunked(q, k, v, g, beta, state, chunk: int):
    """gated_delta_step over a sequence, a chunk of `chunk` positions (a power of 2) at a time, from `state` (zero
    if None), as transformers' torch_chunk_gated_delta_rule: within a chunk the updates are one triangular
    system (the UT transform), solved for all chunks at once (unit_lower_inverse); chunk to chunk, the state alone
    is carried. -> (out [B, L, H, Dv], state), in float32."""
    B, L, H, Dk = k.shape
    Dv = v.shape[-1]
    pad = -L % chunk  # zeros: no decay and no update
    q, k, v, g, beta = (mx.pad(y.astype(mx.float32), [(0, 0), (0, pad)] + [(0, 0)] * (y.ndim - 2))
                        for y in (q, k, v, g, beta))
    n = (L + pad) // chunk
    q, k, v = (y.swapaxes(1, 2).reshape(B, H, n, chunk, -1) for y in (q, k, v))
    g, beta = (y.swapaxes(1, 2).reshape(B, H, n, chunk) for y in (g, beta))
    decayed = mx.cumsum(g, axis=-1)  # log of the decay from the chunk's start to each position
    causal = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_))
    gaps = decayed[..., :, None] - decayed[..., None, :]
    decay = mx.where(causal, exp(mx.where(causal, gaps, 0)), 0)  # from position j to each i >= j
    k_beta = k * beta[..., None]
    solve = unit_lower_inverse(mx.where(mx.tril(causal, -1), (k_beta @ k.swapaxes(-1, -2)) * decay, 0))
    values = solve @ (v * beta[..., None])
    reads = solve @ (k_beta * exp(decayed)[..., None])  # what each position's update reads of the chunk's state
    within = (q @ k.swapaxes(-1, -2)) * decay
    q = q * exp(decayed)[..., None]
    k = k * exp(decayed[..., -1:] - decayed)[..., None]
    kept = exp(decayed[..., -1])[..., None, None]
    state = mx.zeros((B, H, Dk, Dv), mx.float32) if state is None else state
    out = []
    for i in range(n):
        new = values[:, :, i] - reads[:, :, i] @ state
        out.append(q[:, :, i] @ state + within[:, :, i] @ new)
        state = state * kept[:, :, i] + k[:, :, i].swapaxes(-1, -2) @ new
    out = mx.stack(out, axis=2).reshape(B, H, n * chunk, Dv)[:, :, :L]
    return out.swapaxes(1, 2), state


def unit_lower_inverse(lower):
    """(I + lower)^-1 for strictly lower triangular matrices lower [..., C, C] (C a power of 2), by diagonal blocks
    of doubling size, all blocks of a size at once: [[A, 0], [X, D]]^-1 = [[A^-1, 0], [-D^-1 X A^-1, D^-1]]. Each
    step's products are parts of the inverse itself, whose size they keep (a power series in lower would not)."""
    *lead, C, _ = lower.shape
    axis = len(lead)
    inverse = mx.ones((*lead, C, 1, 1), lower.dtype)
    size = 1
    while size < C:
        blocks = C // (2 * size)
        # each 2size x 2size diagonal block of lower, [..., blocks, 2size, 2size]
        diagonal = mx.diagonal(lower.reshape(*lead, blocks, 2 * size, blocks, 2 * size), axis1=axis, axis2=axis + 2)
        below = mx.moveaxis(diagonal, -1, axis)[..., size:, :size]
        pairs = inverse.reshape(*lead, blocks, 2, size, size)
        first, second = pairs[..., 0, :, :], pairs[..., 1, :, :]
        zeros = mx.zeros_like(first)
        inverse = mx.concatenate([mx.concatenate([first, zeros], axis=-1),
                                  mx.concatenate([-(second @ below @ first), second], axis=-1)], axis=-2)
        size *= 2
    return inverse.reshape(*lead, C, C)


class GatedDeltaDecoderLayer(StateMixerLayer):
    """Qwen3-Next's and Qwen3.5's decoder layer: linear attention (linear_attn, GatedDeltaNet) in the layers of
    type linear_attention, attention (self_attn, its output gated) in the others; then the MLP, or in moe_layers
    the mixture of experts; each between its norm and the residual stream."""
    state_type, mixer_name, mixer = "linear_attention", "linear_attn", GatedDeltaNet


# Mamba-2 (Granite 4, Falcon-H1)


class CausalConv1d(nn.Module):
    """A causal convolution of each channel alone (depthwise) over its last `kernel` positions, its weight
    [channels, 1, kernel] as transformers' nn.Conv1d holds it."""

    def __init__(self, channels: int, kernel: int, bias=True):
        super().__init__()
        self.weight = mx.zeros((channels, 1, kernel))
        if bias:
            self.bias = mx.zeros((channels,))

    def __call__(self, x, state=None):
        """(output, state) of x [batch, length, channels] after `state`, the inputs before it (zeros if None): the
        last kernel - 1 inputs, the state after x."""
        kernel = self.weight.shape[-1]
        if state is None:
            state = mx.zeros((x.shape[0], kernel - 1, x.shape[-1]), x.dtype)
        x = mx.concatenate([state, x], axis=1)
        y = causal_conv(x, self.weight.astype(x.dtype))
        return y + self.bias if "bias" in self else y, x[:, x.shape[1] - kernel + 1:]


class GatedRMSNorm(nn.Module):
    """RMSNorm over each of `groups` groups of features, of x gated by silu(gate): the gate applied before the norm
    (Mamba-2's, Granite 4's) or after it (gate_first False: Falcon-H1's mamba_norm_before_gate); in float32."""

    def __init__(self, dims: int, groups: int, eps: float, gate_first=True):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.groups, self.eps, self.gate_first = groups, eps, gate_first

    def __call__(self, x, gate):
        gate = silu(gate.astype(mx.float32))
        x = x.astype(mx.float32) * gate if self.gate_first else x.astype(mx.float32)
        grouped = x.reshape(*x.shape[:-1], self.groups, -1)
        x = mx.fast.rms_norm(grouped, None, self.eps).reshape(x.shape) * self.weight
        return x if self.gate_first else x * gate


def segment_sums(x):
    """[..., T, T]: at [i, j] the sum of x[..., j + 1 .. i] (0 where i == j), -inf where j > i: the log of the
    decay from step j to step i. Summed within the triangle rather than as a difference of cumulative sums, which
    loses the small sums of long rows to rounding."""
    T = x.shape[-1]
    i, j = mx.arange(T)[:, None], mx.arange(T)[None]
    sums = mx.cumsum(mx.where(i > j, x[..., None], 0), axis=-2)
    return mx.where(i >= j, sums, -mx.inf)


def mamba2_scan(x, dt, A, B, C, chunk: int, state=None):
    """Mamba-2's selective scan h[t] = exp(dt[t] A) h[t-1] + dt[t] x[t] B[t], y[t] = h[t] C[t], from `state` (zeros
    if None), in its chunked form (state space duality): within a chunk of `chunk` positions, the outputs are
    products of masked matrices, as attention's; the states entering the chunks, one product over the chunks'
    decays. x [b, L, heads, p]; dt [b, L, heads] (after softplus); A [heads]; B, C [b, L, groups, n], each group's
    shared by its heads; state [b, heads, p, n]. All in float32; exp the CPU's fast one (exp, below), over the
    chunks' matrices of decays. (y [b, L, heads, p], the state after x)."""
    b, L, heads, p = x.shape
    groups, n = B.shape[-2:]
    shared = heads // groups
    chunk = min(chunk, L)  # a shorter row is one chunk, unpadded
    pad = -L % chunk
    chunks = (L + pad) // chunk

    def in_chunks(y, *order):  # [b, chunks, groups, ...] (padding: no input, no decay)
        y = mx.pad(y, [(0, 0), (0, pad)] + [(0, 0)] * (y.ndim - 2))
        return y.reshape(b, chunks, chunk, groups, -1, *y.shape[3:]).transpose(0, 1, 3, *order)

    xdt = in_chunks(x * dt[..., None], 4, 2, 5)  # [b, c, g, shared, chunk, p]
    B, C = (in_chunks(y, 4, 2, 5) for y in (B, C))  # [b, c, g, 1, chunk, n]
    decays = in_chunks(dt * A, 4, 2)  # [b, c, g, shared, chunk]: the log of each position's decay
    within = mx.cumsum(decays, axis=-1)  # from the chunk's start
    # within the chunks: y[i] = sum over j <= i of (C[i] . B[j]) * decay j -> i * x[j] dt[j], the decays the
    # differences of `within` (one fused operation, as mamba_ssm's kernels compute them: over a chunk, their
    # rounding stays small; over the chunks, segment_sums)
    causal = mx.arange(chunk)[:, None] >= mx.arange(chunk)[None]
    decay = exp(mx.where(causal, within[..., :, None] - within[..., None, :], -mx.inf))
    y = ((C @ B.swapaxes(-1, -2)) * decay) @ xdt
    # each chunk's own contribution to the state at its end, then the states entering each chunk
    ends = (xdt * exp(within[..., -1:] - within)[..., None]).swapaxes(-1, -2) @ B  # [b, c, g, shared, p, n]
    first = mx.zeros((b, 1, groups, shared, p, n)) if state is None else state.reshape(b, 1, groups, shared, p, n)
    ends = mx.concatenate([first, ends], axis=1).transpose(0, 2, 3, 1, 4, 5).reshape(b, groups, shared, chunks + 1, -1)
    totals = mx.pad(within[..., -1].transpose(0, 2, 3, 1), [(0, 0)] * 3 + [(1, 0)])  # [b, g, shared, c + 1]
    states = (exp(segment_sums(totals)) @ ends).reshape(b, groups, shared, chunks + 1, p, n)
    entering = states[:, :, :, :-1].transpose(0, 3, 1, 2, 4, 5)  # [b, c, g, shared, p, n]
    y = y + (C @ entering.swapaxes(-1, -2)) * exp(within)[..., None]
    y = y.transpose(0, 1, 4, 2, 3, 5).reshape(b, chunks * chunk, heads, p)[:, :L]
    return y, states[:, :, :, -1].reshape(b, heads, p, n)


def mamba2_step(x, dt, A, B, C, state):
    """One position of mamba2_scan, recurrently: x [b, heads, p], dt [b, heads], B, C [b, groups, n], state
    [b, heads, p, n]. (y [b, heads, p], the state after x)."""
    shared = x.shape[1] // B.shape[1]
    B, C = mx.repeat(B, shared, axis=1), mx.repeat(C, shared, axis=1)
    state = state * exp(dt * A)[..., None, None] + (x * dt[..., None])[..., None] * B[:, :, None]
    return (state @ C[..., None])[..., 0], state


class Mamba2Mixer(nn.Module):
    """A Mamba-2 layer, under transformers' names: in_proj's output split into the gate z, the convolution's input
    (x, B, C) and dt; a causal convolution (conv1d) and the activation over x, B and C; the scan (mamba2_scan, or
    mamba2_step for one new position with a cache) with dt = softplus(dt + dt_bias) clipped to time_step_limit,
    A = -exp(A_log), plus D * x; then the gate, with or without a gated norm (`gated_norm`: GatedRMSNorm's
    "gate_first" or "norm_first", or None for y * silu(z)), and out_proj. Falcon-H1's variant: its inputs times
    `input_scale` (ssm_in_multiplier), in_proj's five parts (z, x, B, C, dt) times `projection_scales`
    (ssm_multipliers), out_proj's bias its own (`out_bias`). chunk_size may be set (a test's short chunks)."""

    def __init__(self, args: ModelArgs, gated_norm: Optional[str] = "gate_first", out_bias: Optional[bool] = None,
                 input_scale: float = 1.0, projection_scales: Optional[tuple] = None):
        super().__init__()
        self.heads, self.head_dim, self.groups = args.mamba_n_heads, args.mamba_d_head, args.mamba_n_groups
        self.state_size, self.chunk_size = args.mamba_d_state, args.mamba_chunk_size
        inner, grouped = self.heads * self.head_dim, self.groups * self.state_size
        self.parts = (inner, 2 * inner + 2 * grouped)  # in_proj's output split there: z, x B C, dt
        self.in_proj = nn.Linear(args.hidden_size, 2 * inner + 2 * grouped + self.heads, bias=args.mamba_proj_bias)
        self.conv1d = CausalConv1d(inner + 2 * grouped, args.mamba_d_conv, args.mamba_conv_bias)
        self.act = ACTIVATIONS[args.hidden_act]
        self.dt_bias = mx.ones((self.heads,))
        self.A_log = mx.log(mx.arange(1, self.heads + 1, dtype=mx.float32))
        self.D = mx.ones((self.heads,))
        if gated_norm is not None:
            self.norm = GatedRMSNorm(inner, self.groups, args.rms_norm_eps, gated_norm == "gate_first")
        self.out_proj = nn.Linear(inner, args.hidden_size, bias=args.mamba_proj_bias if out_bias is None else out_bias)
        self.time_step_limit = tuple(args.time_step_limit or (0.0, None))
        self.input_scale = input_scale
        self._projection_scale = None if projection_scales is None else mx.concatenate(
            [mx.full((size,), scale) for size, scale in zip((inner, inner, grouped, grouped, self.heads),
                                                           projection_scales)])

    def __call__(self, x, cache=None, example_rows=None):
        """cache: a StateCache whose states it reads and sets (conv, ssm); the caller advances its offset.
        example_rows: a packed row's {"slots", "order"} (packed_layout): each example's state starts at zero."""
        if example_rows is not None:
            return in_example_rows(lambda rows: self(rows, cache), x, example_rows)
        batch, length, _ = x.shape
        projected = self.in_proj(x * self.input_scale if self.input_scale != 1.0 else x)
        if self._projection_scale is not None:
            projected = projected * self._projection_scale.astype(projected.dtype)
        gate, xBC, dt = mx.split(projected, self.parts, axis=-1)
        states = cache.states if cache is not None else {}
        xBC, conv_state = self.conv1d(xBC, states.get("conv"))
        inner, grouped = self.heads * self.head_dim, self.groups * self.state_size
        h, B, C = mx.split(self.act(xBC).astype(mx.float32), [inner, inner + grouped], axis=-1)
        h = h.reshape(batch, length, self.heads, self.head_dim)
        B, C = (y.reshape(batch, length, self.groups, self.state_size) for y in (B, C))
        dt = mx.clip(nn.softplus(dt.astype(mx.float32) + self.dt_bias.astype(mx.float32)), *self.time_step_limit)
        A = -mx.exp(self.A_log.astype(mx.float32))
        if length == 1 and "ssm" in states:
            y, state = mamba2_step(h[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], states["ssm"])
            y = y[:, None]
        else:
            y, state = mamba2_scan(h, dt, A, B, C, self.chunk_size, states.get("ssm"))
        if cache is not None:
            cache.states.update(conv=conv_state, ssm=state)
        y = (y + h * self.D.astype(mx.float32)[:, None]).reshape(batch, length, -1)
        y = self.norm(y, gate) if "norm" in self else y * silu(gate.astype(mx.float32))
        return self.out_proj(y.astype(x.dtype))


class GraniteMoeHybridDecoderLayer(nn.Module):
    """Granite 4's layer: a Mamba-2 mixer (mamba) or attention (self_attn), as layer_types says, then the mixture of
    experts (block_sparse_moe: Granite MoE's) beside a gated MLP that every token goes through (shared_mlp, its
    gate and up in input_linear; alone where num_local_experts is 0); each after its norm, joining the residual
    stream times residual_scale."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = norm(args), norm(args)
        if args.layer_type(layer) == "linear_attention":
            self.mamba = Mamba2Mixer(args)
        else:
            self.self_attn = Attention(args, layer)
        if args.num_local_experts:
            self.block_sparse_moe = GraniteMoE(args)
        self.shared_mlp = MLP(args, ("input_linear", "input_linear", "output_linear"),
                              args.shared_expert_intermediate_size, bias=False)
        self.residual_scale = args.residual_scale

    def __call__(self, x, mask, cache=None, example_rows=None):
        h = self.input_layernorm(x)
        if "mamba" in self:
            h = self.mamba(h, cache, example_rows)
            if cache is not None:
                cache.offset += x.shape[1]
        else:
            h = self.self_attn(h, mask, cache, example_rows)
        x = x + h * self.residual_scale
        h = self.post_attention_layernorm(x)
        out = self.block_sparse_moe(h) + self.shared_mlp(h) if "block_sparse_moe" in self else self.shared_mlp(h)
        return x + out * self.residual_scale

    def make_cache(self):
        return StateCache() if "mamba" in self else KVCache()


# Falcon-H1: its own forward path


class HybridCache(KVCache):
    """The cache of a layer whose attention and a layer carrying a state run side by side (Falcon-H1): a KVCache
    with a StateCache's states, each reading its own part; the positions seen (offset) are the attention's."""

    def __init__(self):
        super().__init__()
        self.states = {}


class FalconH1MLP(MLP):
    """Falcon-H1's MLP: its gate's output times mlp_multipliers[0] before the activation, its output times
    mlp_multipliers[1]."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.gate_multiplier, self.down_multiplier = args.mlp_multipliers

    def __call__(self, x):
        gate = self.act(self.gate_proj(x) * self.gate_multiplier)
        return self.down_proj(gate * self.up_proj(x)) * self.down_multiplier


class FalconH1DecoderLayer(nn.Module):
    """Falcon-H1's parallel hybrid: attention and a Mamba-2 mixer side by side on input_layernorm's output, their
    sum joining the stream; then the MLP on pre_ff_layernorm's. The muP multipliers scale each one's input and
    output outside its linear layers, as transformers does, so that adapters see what PEFT's see there; the keys'
    (key_multiplier) scales every score: the attention's scale."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(replace(args, attention_scale=args.head_dim ** -0.5 * args.key_multiplier), layer)
        gated_norm = ("norm_first" if args.mamba_norm_before_gate else "gate_first") if args.mamba_rms_norm else None
        self.mamba = Mamba2Mixer(args, gated_norm, args.projectors_bias, args.ssm_in_multiplier, args.ssm_multipliers)
        self.feed_forward = FalconH1MLP(args)
        self.input_layernorm, self.pre_ff_layernorm = norm(args), norm(args)
        self.attention_in, self.attention_out = args.attention_in_multiplier, args.attention_out_multiplier
        self.ssm_out = args.ssm_out_multiplier

    def __call__(self, x, mask, cache=None, example_rows=None):
        h = self.input_layernorm(x)
        if example_rows is None:
            h = x + self.mixed(h, mask, cache)
        else:  # both mixers within each example, in one layout of the row
            h = x + in_example_rows(lambda rows: self.mixed(rows, mask), h, example_rows)
        return h + self.feed_forward(self.pre_ff_layernorm(h))

    def mixed(self, h, mask, cache=None):
        """The Mamba-2 mixer's and attention's outputs on the normed stream h, summed."""
        scanned = self.mamba(h, cache) * self.ssm_out
        return scanned + self.self_attn(h * self.attention_in, mask, cache) * self.attention_out

    def make_cache(self):
        return HybridCache()


# LoRA and DoRA


EMBEDDINGS = (nn.Embedding, nn.QuantizedEmbedding)


def features(layer) -> tuple:
    """(output, input) features of a linear layer, or of each expert of a stack, quantized or not (a quantized
    weight's rows hold their values packed in 32-bit words); of an embedding (a weight of a row a token), its
    dimensions and its vocabulary."""
    outputs, inputs = layer.weight.shape[-2:]
    inputs = inputs * 32 // layer.bits if "scales" in layer else inputs
    return (inputs, outputs) if isinstance(layer, EMBEDDINGS) else (outputs, inputs)


class LoRALinear(nn.Module):
    """y = linear(x) + scale * dropout(x) @ lora_a @ lora_b, over a frozen nn.Linear or nn.QuantizedLinear.
    lora_b starts at zero, so an untrained adapter changes nothing."""

    @classmethod
    def from_linear(cls, linear, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        output_dims, input_dims = features(linear)
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


class LoRAEmbedding(nn.Module):
    """PEFT's LoRA of an embedding (lora.Embedding): y = embedding(ids) + scale * lora_a[ids] @ lora_b, over a
    frozen nn.Embedding or nn.QuantizedEmbedding. lora_a [vocabulary, rank] starts at zero and lora_b [rank, dims]
    normal, as PEFT starts them, so an untrained adapter changes nothing; no dropout, as PEFT's has none. An output
    layer tied to the embedding (as_linear) uses the adapted weight too, as PEFT's ensure_weight_tying does."""
    peft_names = {"lora_a": "lora_embedding_A", "lora_b": "lora_embedding_B"}  # PEFT's, transposed

    @classmethod
    def from_linear(cls, embedding, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        """(named as LoRALinear's, for wrap_lora_layers)"""
        dims, vocabulary = features(embedding)
        lora = cls()
        lora.embedding, lora.scale = embedding, scale
        lora.lora_a = mx.zeros((vocabulary, rank))
        lora.lora_b = mx.random.normal((rank, dims))
        return lora

    def __call__(self, ids):
        h = self.embedding(ids)
        return h + self.scale * (self.lora_a[ids] @ self.lora_b).astype(h.dtype)

    def as_linear(self, x):
        return self.embedding.as_linear(x) + self.scale * ((x @ self.lora_b.T.astype(x.dtype)) @
                                                           self.lora_a.T.astype(x.dtype))

    def merged_weight(self):
        """W + scale * lora_a @ lora_b, in float32."""
        embedding = self.embedding
        weight = (dequantized_weight(embedding, embedding.scales.dtype) if "scales" in embedding
                  else embedding.weight)
        return weight.astype(mx.float32) + self.scale * (self.lora_a @ self.lora_b)

    def to_linear(self):
        """The merged embedding (merged_weight), re-quantized like the base if it was (named as LoRALinear's, for
        fuse.py)."""
        embedding = self.embedding
        quantized = "scales" in embedding
        weight = self.merged_weight()
        fused = nn.Embedding(*weight.shape)
        fused.weight = weight.astype(embedding.scales.dtype if quantized else embedding.weight.dtype)
        return QuantizedEmbedding.from_embedding(fused, embedding.group_size, embedding.bits) if quantized else fused


class DoRAEmbedding(LoRAEmbedding):
    """PEFT's DoRA of an embedding (DoraEmbeddingLayer): LoRAEmbedding's merged weight W + scale * lora_a @ lora_b
    with each column (an embedding dimension, over the vocabulary) rescaled to a trainable magnitude m [dims], which
    starts at ||W||_column, so that an untrained adapter changes nothing; the norm a constant to the gradient, as
    DoRALinear's. Not for a tied output layer (PEFT gives it magnitudes of its own)."""
    peft_names = {**LoRAEmbedding.peft_names, "m": "lora_magnitude_vector"}

    @classmethod
    def from_linear(cls, embedding, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        dora = super().from_linear(embedding, rank, scale, dropout)
        dora.m = mx.linalg.norm(LoRAEmbedding.merged_weight(dora), axis=0)  # (lora_a zero: the base weight's)
        return dora

    def __call__(self, ids):
        h = super().__call__(ids)
        norm = mx.stop_gradient(mx.linalg.norm(super().merged_weight(), axis=0))
        return (self.m / norm).astype(h.dtype) * h

    def merged_weight(self):
        """m / ||W + ΔW||_column * (W + ΔW), in float32."""
        weight = super().merged_weight()
        return (self.m / mx.linalg.norm(weight, axis=0)) * weight


class ExpertsLoRA(nn.Module):
    """LoRALinear for each expert of an ExpertsLinear (or QuantizedExpertsLinear), the adapters stacked as mlx-lm's
    LoRASwitchLinear stacks them: lora_a [experts, rank, input], lora_b [experts, output, rank]; each row through
    its expert's (through_experts' expert). `adapted` lists the adapted experts where not all are: the others'
    lora_b counts as zero, so that their outputs, and the gradients of their adapters, are the base's."""

    @classmethod
    def from_linear(cls, linear, rank: int = 8, scale: float = 20.0, dropout: float = 0.0, adapted=None):
        experts = linear.weight.shape[0]
        output_dims, input_dims = features(linear)
        lora = cls(experts, input_dims, output_dims, rank, scale, dropout, adapted)
        lora.linear = linear
        return lora

    def __init__(self, experts, input_dims, output_dims, rank=8, scale=20.0, dropout=0.0, adapted=None):
        super().__init__()
        self.linear = ExpertsLinear(experts, input_dims, output_dims)
        self.dropout = nn.Dropout(p=dropout)
        self.scale, self.adapted = scale, adapted
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(experts, rank, input_dims))
        self.lora_b = mx.zeros((experts, output_dims, rank))

    def __call__(self, x, indices, sorted_indices: bool):
        return self.linear(x, indices, sorted_indices) + self.scale * self.lora_output(x, indices, sorted_indices)

    def lora_output(self, x, indices, sorted_indices: bool):
        """Each row's dropout(x) @ lora_a.T @ lora_b.T of its expert: the adapter's output before scale."""
        z = mx.gather_mm(self.dropout(x), self.lora_a.swapaxes(-1, -2).astype(x.dtype), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        return mx.gather_mm(z, self.adapted_b().swapaxes(-1, -2).astype(x.dtype), rhs_indices=indices,
                            sorted_indices=sorted_indices)

    def adapted_experts(self):
        """Whether each expert is adapted, [experts] (None: all are)."""
        if self.adapted is None:
            return None
        return (mx.arange(self.lora_b.shape[0])[:, None] == mx.array(self.adapted)[None]).any(axis=-1)

    def adapted_b(self):
        """lora_b, zero for the experts not adapted."""
        adapted = self.adapted_experts()
        return self.lora_b if adapted is None else mx.where(adapted[:, None, None], self.lora_b, 0)

    def base_weight(self):
        """The frozen weights [experts, output, input], dequantized if the base is quantized."""
        linear = self.linear
        return dequantized_weight(linear, linear.scales.dtype) if "scales" in linear else linear.weight

    def merged_weight(self):
        """W + scale * lora_b @ lora_a for each expert, in float32."""
        return self.base_weight().astype(mx.float32) + self.scale * (self.adapted_b() @ self.lora_a)

    def to_linear(self):
        """The merged layer (merged_weight), re-quantized like the base if it was."""
        linear = self.linear
        quantized = "scales" in linear
        weight = self.merged_weight()
        experts, output_dims, input_dims = weight.shape
        fused = ExpertsLinear(experts, input_dims, output_dims)
        fused.weight = weight.astype(linear.scales.dtype if quantized else linear.weight.dtype)
        return QuantizedExpertsLinear.from_linear(fused, linear.group_size, linear.bits) if quantized else fused


class ExpertsDoRA(ExpertsLoRA):
    """DoRALinear for each expert of an ExpertsLinear: its magnitudes m [experts, output] (an expert not adapted
    keeps the base's: its rows are not rescaled)."""

    @classmethod
    def from_linear(cls, linear, rank: int = 8, scale: float = 20.0, dropout: float = 0.0, adapted=None):
        dora = super().from_linear(linear, rank, scale, dropout, adapted)
        dora.m = mx.linalg.norm(dora.base_weight().astype(mx.float32), axis=-1)
        return dora

    def __call__(self, x, indices, sorted_indices: bool):
        # as DoRALinear's, the norm a constant to the gradient
        ratio = self.ratio(mx.stop_gradient(mx.linalg.norm(super().merged_weight(), axis=-1)))
        return mx.expand_dims(ratio[indices].astype(x.dtype), -2) * super().__call__(x, indices, sorted_indices)

    def ratio(self, norm):
        """m / norm for each expert's rows, 1 for the experts not adapted."""
        adapted = self.adapted_experts()
        return self.m / norm if adapted is None else mx.where(adapted[:, None], self.m / norm, 1.0)

    def merged_weight(self):
        """m / ||W + ΔW||_row * (W + ΔW) for each expert, in float32."""
        weight = super().merged_weight()
        return self.ratio(mx.linalg.norm(weight, axis=-1))[..., None] * weight


def linear_layers(layer: nn.Module) -> list:
    """Module paths of the linear layers inside a decoder layer: the possible LoRA targets; each expert's layer in
    a stack (EXPERT_LAYERS, at experts.P) one of them, experts.{e}.P."""
    paths = []
    for path, m in layer.named_modules():
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            paths.append(path)
        elif isinstance(m, EXPERT_LAYERS):
            head, name = path.rsplit(".", 1)
            paths += [f"{head}.{e}.{name}" for e in reversed(range(m.weight.shape[0]))]
    return paths[::-1]  # named_modules() lists the last defined first


def linear_layer(modules: dict, path: str):
    """The linear layer at `path` among `modules` (named_modules' dict), None if there is none; for an expert's
    layer (experts.{e}.P), the stack of every expert's (EXPERT_LAYERS)."""
    expert = EXPERT_PATH.fullmatch(path)
    stack = modules.get(f"{expert[1]}.{expert[3]}") if expert else None
    if isinstance(stack, EXPERT_LAYERS):
        return stack if int(expert[2]) < stack.weight.shape[0] else None
    layer = modules.get(path)
    return layer if isinstance(layer, (nn.Linear, nn.QuantizedLinear)) else None


def adaptable_layer(modules: dict, path: str):
    """The layer at `path` among `modules` (named_modules' dict) that adapters can wrap: a linear layer (linear_layer)
    or an embedding; None if there is none."""
    return modules[path] if isinstance(modules.get(path), EMBEDDINGS) else linear_layer(modules, path)


def default_lora_targets(model: Model) -> list:
    """The family's (Family.lora_targets): the reference's q_proj and v_proj for most."""
    return list(model.args.family.lora_targets)


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


def every_linear_layer(layers) -> dict:
    """{path: linear layer} of the linear layers inside these decoder layers (linear_layers; an expert's layer: its
    stack), each path once (layers differ where some hold a mixture of experts and others an MLP), in the first's
    order."""
    found = {}
    for layer in layers:
        modules = dict(layer.named_modules())
        for path in linear_layers(layer):
            found.setdefault(path, linear_layer(modules, path))
    return found


# The layers outside the decoder layers that take adapters, by the names that target them (PEFT's module names)
OUTER_TARGETS = {"embed_tokens": "model.embed_tokens", "model.embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}


def outer_paths(model: Model, targets) -> list:
    """The paths of the embedding and output layer that `targets` name (OUTER_TARGETS), by their exact names. Where
    the output layer is the embedding's (tie_word_embeddings), an adapter of the embedding is the output layer's too
    (LoRAEmbedding.as_linear, PEFT's ensure_weight_tying), and lm_head alone, which would adapt the output layer
    apart, is a ValueError."""
    paths = sorted({OUTER_TARGETS[t] for t in targets if t in OUTER_TARGETS})
    if model.args.tie_word_embeddings and "lm_head" in paths:
        if "model.embed_tokens" not in paths:
            raise ValueError("lm_head: the model's output layer is its embedding (tie_word_embeddings), which an "
                             "adapter adapts in both places: target embed_tokens (as PEFT's ensure_weight_tying)")
        paths.remove("lm_head")
    return paths


def target_paths(model: Model, targets, num_layers: int) -> list:
    """The paths (model.layers.N....) of the linear layers that `targets` name (target_matches) in the last
    `num_layers` decoder layers (-1: all), after those of the embedding and output layer they name (outer_paths)."""
    layers = last_layers(model, num_layers)
    choices = list(every_linear_layer(layers))
    layer_targets = [t for t in targets if t not in OUTER_TARGETS]
    for target in layer_targets:
        if not any(target_matches(path, target) for path in choices):
            raise ValueError(f"{target} matches no layer; choices: {', '.join(choices + ['embed_tokens', 'lm_head'])}")
    first = len(model.layers) - len(layers)
    # in named_modules' order, the last defined first: the order the adapters draw their random starts in
    return outer_paths(model, targets) + [
        f"model.layers.{first + i}.{path}" for i, layer in enumerate(layers)
        for path in reversed(linear_layers(layer)) if any(target_matches(path, t) for t in layer_targets)]


@dataclass(frozen=True)
class AdapterKind:
    """An adapter kind (adapter_config.json's fine_tune_type) in one place: the layer that wraps a linear layer,
    the one that wraps a stack of experts' layers and the one that wraps an embedding (each fuses itself:
    to_linear); the arrays each adapted layer holds, named here (the first [input, rank]: it says the rank) and in
    PEFT's files (base_model.model.<layer>.<PEFT's name>, transposed; an embedding's, its class's peft_names); the
    fields of PEFT's adapter_config.json that say this
    kind; the arrays that LoRA+ trains at its higher learning rate (PEFT's create_loraplus_optimizer: lora_B and the
    vectors); and what fuse.py's model card calls it."""
    layer: type
    experts_layer: type
    embedding_layer: type
    peft_names: dict  # our name: PEFT's
    peft_config: dict
    lora_plus: tuple
    described: str

    @property
    def weights(self) -> tuple:
        return tuple(self.peft_names)


ADAPTER_KINDS = {
    "lora": AdapterKind(LoRALinear, ExpertsLoRA, LoRAEmbedding, {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"},
                        {"use_dora": False}, ("lora_b",), "LoRA adapters"),
    "dora": AdapterKind(DoRALinear, ExpertsDoRA, DoRAEmbedding, {"lora_a": "lora_A.weight",
                                                                 "lora_b": "lora_B.weight",
                                                                 "m": "lora_magnitude_vector"},
                        {"use_dora": True}, ("lora_b", "m"), "DoRA adapters"),
}


def wrap_lora_layers(model: nn.Module, paths, rank: int, scale: float, dropout: float = 0.0, kind="lora"):
    """Wrap the linear layers at these paths in the layer of ADAPTER_KINDS[kind] (LoRALinear, ...), the experts'
    layers of a stack in one of its experts_layer (ExpertsLoRA, ...): for training new adapters and for loading
    saved ones alike."""
    modules = dict(model.named_modules())
    adapter = ADAPTER_KINDS[kind]
    wrapped, stacks = [], {}
    for path in paths:
        expert = EXPERT_PATH.fullmatch(path)
        stack = f"{expert[1]}.{expert[3]}" if expert else None
        if isinstance(modules.get(stack), EXPERT_LAYERS):
            stacks.setdefault(stack, set()).add(int(expert[2]))
        elif isinstance(modules[path], EMBEDDINGS):
            if adapter.embedding_layer is DoRAEmbedding and model.args.tie_word_embeddings:
                raise ValueError(f"{path}: DoRA of an embedding that is the output layer too (tie_word_embeddings) is "
                                 f"not supported (PEFT gives the output layer magnitudes of its own); use LoRA")
            wrapped.append((path, adapter.embedding_layer.from_linear(modules[path], rank, scale)))
        else:
            wrapped.append((path, adapter.layer.from_linear(modules[path], rank, scale, dropout)))
    for stack, experts in stacks.items():
        adapted = None if len(experts) == modules[stack].weight.shape[0] else tuple(sorted(experts))
        wrapped.append((stack, adapter.experts_layer.from_linear(modules[stack], rank, scale, dropout, adapted)))
    model.update_modules(tree_unflatten(wrapped))


def linear_to_lora_layers(model: Model, targets, num_layers: int, rank=8, scale=20.0, dropout=0.0, kind="lora"):
    """New adapters on the `targets` of the last `num_layers` decoder layers (target_paths)."""
    wrap_lora_layers(model, target_paths(model, targets, num_layers), rank, scale, dropout, kind)


def lora_layers(model: nn.Module) -> dict:
    """The adapted layers (of every ADAPTER_KINDS) by path, a stack of experts' by the stack's."""
    kinds = tuple(layer for k in ADAPTER_KINDS.values() for layer in (k.layer, k.experts_layer, k.embedding_layer))
    return {path: m for path, m in model.named_modules() if isinstance(m, kinds)}


def initialise_adapters(layers: dict, init: str):
    """Start the adapters of `layers` (LoRALinear by path, just made) as PEFT's init_lora_weights `init` does:
    "default" as made (A uniform in +-1/sqrt(inputs), as PEFT's, B zero); "gaussian" A normal with a standard deviation
    of 1/rank; "pissa" A and B the principal singular vectors, each times the root of its singular value over the
    scale ("pissa_niter_N", PEFT's faster randomized SVD, the exact one here); "olora" B and A the first rank columns
    and rows of W's QR factors. PiSSA and OLoRA move that product out of the base weight, which becomes the residual
    W - scale * (A B)^T, so that the layer starts as it was, and keep their start (initial_a, initial_b, frozen) for
    saving adapters of the original weight (saved_adapters). ValueError for a layer they cannot start: a quantized
    one (its residual would be quantized again; PEFT too asks for a float base), a stack of experts'."""
    for path, layer in layers.items():
        if init == "default" or init == "gaussian" and isinstance(layer, LoRAEmbedding):  # PEFT's start for both
            continue
        if type(layer) is not LoRALinear:
            raise ValueError(f"{init} starts LoRA adapters of linear layers, not {path}'s ({type(layer).__name__})")
        rank = layer.lora_a.shape[1]
        if init == "gaussian":
            layer.lora_a = mx.random.normal(layer.lora_a.shape) / rank
            continue
        if isinstance(layer.linear, nn.QuantizedLinear):
            raise ValueError(f"{path} is quantized; PiSSA and OLoRA make its weight a residual, which needs a float "
                             f"base: train on the float model (convert without -q)")
        weight = layer.linear.weight.astype(mx.float32)  # [output, input]
        if init == "olora":
            q, r = mx.linalg.qr(weight, stream=mx.cpu)
            a, b = r[:rank].T, q[:, :rank].T
        else:
            u, singular, vt = mx.linalg.svd(weight, stream=mx.cpu)
            root = mx.sqrt(singular[:rank] / layer.scale)
            a, b = (root[:, None] * vt[:rank]).T, (u[:, :rank] * root).T
        layer.linear.weight = (weight - layer.scale * (a @ b).T).astype(layer.linear.weight.dtype)
        layer.lora_a, layer.lora_b, layer.initial_a, layer.initial_b = a, b, a, b
        layer.freeze(recurse=False, keys=["initial_a", "initial_b"])


def saved_adapters(model: nn.Module, weights: dict) -> dict:
    """The adapters' `weights` (by name) as files hold them: a PiSSA or OLoRA layer's (initialise_adapters) as
    adapters of its original weight, W + scale * (A B - A0 B0)^T = W + scale * ([A A0] [B; -B0])^T, of twice the
    rank, as PEFT converts them (save_pretrained's path_initial_model_for_weight_conversion)."""
    weights = dict(weights)
    for path, layer in lora_layers(model).items():
        if "initial_a" in layer and f"{path}.lora_a" in weights:
            weights[f"{path}.lora_a"] = mx.concatenate([weights[f"{path}.lora_a"], layer.initial_a], axis=1)
            weights[f"{path}.lora_b"] = mx.concatenate([weights[f"{path}.lora_b"], -layer.initial_b], axis=0)
    return weights


def trained_adapters(model: nn.Module, weights: dict) -> dict:
    """saved_adapters undone: a PiSSA or OLoRA layer's trained A and B, the first half of the saved rank."""
    weights = dict(weights)
    for path, layer in lora_layers(model).items():
        if "initial_a" in layer and f"{path}.lora_a" in weights:
            rank = layer.lora_a.shape[1]
            weights[f"{path}.lora_a"] = weights[f"{path}.lora_a"][:, :rank]
            weights[f"{path}.lora_b"] = weights[f"{path}.lora_b"][:rank]
    return weights


def per_expert(model: Model, weights: dict) -> dict:
    """The model's `weights` (of its trained layers: adapters, or whole layers) as adapter files hold them: a
    stack of experts' (ExpertsLinear's, ExpertsLoRA's) as each expert's, an adapter's of its adapted experts
    alone (CheckpointNames.unstacked)."""
    modules = dict(model.named_modules())
    return dict(pair for name, value in weights.items() for pair in model.args.names.unstacked(
        name, value, getattr(modules[name.rsplit(".", 1)[0]], "adapted", None)))


# Kernels and device-specific paths
#
# MLX's fused operations where they are fast, composed ones where a backend
# lacks them (measured in benchmarks/README.md), and the quantized layers' products.


def silu(x):
    return nn.silu(x) if mx.default_device() != mx.cpu else x / (1.0 + exp(-x))


ACTIVATIONS = {"silu": silu, "gelu": nn.gelu, "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx}
# activations with parameters of their own: a module in each MLP (MLP.act_fn)
ACTIVATION_MODULES = {"xielu": XIELU}


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


def causal_conv(x, weight):
    """The causal depthwise convolution of x [batch, taps - 1 + length, channels], whose first taps - 1 positions
    are the state before the row (zeros, or a cache's), by weight [channels, 1, taps] (a short convolution's, in
    its checkpoint's layout): [batch, length, channels]. mx.conv1d with a group for each channel; on the CPU,
    where MLX's grouped convolution is ten times slower, the sum of the shifted inputs times each tap's weights,
    which mx.compile fuses."""
    taps, length = weight.shape[-1], x.shape[1] - weight.shape[-1] + 1
    if mx.default_device() != mx.cpu:
        return mx.conv1d(x, weight.swapaxes(1, 2), groups=x.shape[-1])
    return sum(x[:, k:k + length] * weight[:, 0, k] for k in range(taps))


def in_example_rows(layer, x, example_rows):
    """layer(rows) on the packed row x's examples laid out one a row (packed_layout's {"slots", "order"}), its
    output laid back as x is: what a layer computes along the row (attention, a scan) then stays within each
    example."""
    slots, order = example_rows["slots"], example_rows["order"]
    index = slots.reshape(-1)
    out = layer(permuted(x[0], index, order).reshape(*slots.shape, -1))
    return permuted(out.reshape(-1, out.shape[-1]), order, index)[None]


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


# The most queries attended at once. MLX 0.32's fused attention on CUDA runs out of memory for 65,536 queries at
# once, and takes 16,384 against up to 65,536 keys (benchmarks/README.md, "The longest example within 24 GB"); on
# the CPU a chunk's scores are all that is held.
ATTENTION_QUERIES = 16384


def attention(q, k, v, scale, mask, softcap=None, sinks=None):
    """Scaled dot-product attention with grouped K/V heads; mask: None, "causal", a boolean array, or one added to
    the scaled scores for each head (alibi_mask); the scores soft-capped to softcap * tanh(scores / softcap) if
    softcap (a path MLX has no fused kernel for); sinks: a logit per head that joins each softmax with no value,
    so that the weights sum to less than 1. Queries beyond ATTENTION_QUERIES attend in chunks of that many,
    causal ones to the keys up to their last."""
    L, length = q.shape[2], k.shape[2]
    if L > ATTENTION_QUERIES:
        parts = []
        for start in range(0, L, ATTENTION_QUERIES):
            end = min(start + ATTENTION_QUERIES, L)
            keys = length - L + end if isinstance(mask, str) else length
            rows = mask if mask is None or isinstance(mask, str) or mask.shape[-2] == 1 else mask[..., start:end, :]
            parts.append(attention(q[:, :, start:end], k[:, :, :keys], v[:, :, :keys], scale, rows, softcap, sinks))
        return mx.concatenate(parts, axis=2)
    if mx.default_device() != mx.cpu and softcap is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    B, H, _, D = q.shape
    k_heads = k.shape[1]
    scores = (q.reshape(B, k_heads, H // k_heads, L, D) * scale) @ k[:, :, None].swapaxes(-1, -2)
    if softcap is not None:
        scores = mx.tanh(scores / softcap) * softcap
    if isinstance(mask, str):
        mask = mx.arange(length - L, length)[:, None] >= mx.arange(length)[None]
    if mask is not None and mask.dtype != mx.bool_:  # batch x heads x queries x keys: the heads grouped as here
        scores = scores + mask.reshape(mask.shape[0], k_heads, H // k_heads, *mask.shape[2:])
    elif mask is not None:
        if mask.ndim == 4:  # batch x 1 x queries x keys: a group axis for the grouped heads
            mask = mask[:, :, None]
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    top = mx.stop_gradient(scores.max(axis=-1, keepdims=True))
    if sinks is not None:
        sinks = sinks.astype(scores.dtype).reshape(1, k_heads, H // k_heads, 1, 1)
        top = mx.maximum(top, mx.stop_gradient(sinks))
    weights = exp(scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total = total + exp(sinks - top)
    weights = weights / total
    return (weights @ v[:, :, None]).reshape(B, H, L, -1)


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
# 4-bit at rest. On CUDA, for a few rows (generating one token) the quantized matmul is the faster of the two; on
# the CPU its time grows with each row, and from two rows on (a batch generating) it is the slower. Metal keeps
# its quantized matmul: not measured against this. Figures: benchmarks/README.md, "QLoRA against LoRA" and "GRPO
# and batched generation on the CPU".
def dequantizes(x):
    rows = x.size // x.shape[-1]
    return rows > 1 if mx.default_device() == mx.cpu else mx.cuda.is_available() and rows > 8


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
    """Quantize the Linear, ExpertsLinear and Embedding layers for which layer_params(path, module) gives
    {"group_size", "bits"} (None leaves a layer as it is)."""
    replaced = []
    for path, module in model.named_modules():
        params = layer_params(path, module)
        if params is None:
            continue
        if isinstance(module, nn.Linear):
            replaced.append((path, QuantizedLinear.from_linear(module, **params)))
        elif isinstance(module, ExpertsLinear):
            replaced.append((path, QuantizedExpertsLinear.from_linear(module, **params)))
        elif isinstance(module, nn.Embedding):
            replaced.append((path, QuantizedEmbedding.from_embedding(module, **params)))
    model.update_modules(tree_unflatten(replaced))


def dequantize(model: nn.Module, dtype=mx.float32, where=lambda path: True):
    """Replace every quantized layer (whose path `where` accepts) by its float equivalent (for export, a float
    reference, or speed)."""
    replaced = []
    for path, module in model.named_modules():
        if not where(path):
            continue
        if isinstance(module, nn.QuantizedLinear):
            output_dims = module.weight.shape[0]
            linear = nn.Linear(module.scales.shape[-1] * module.group_size, output_dims, bias="bias" in module)
            linear.weight = dequantized_weight(module, dtype)
            if "bias" in module:
                linear.bias = module.bias
            replaced.append((path, linear))
        elif isinstance(module, QuantizedExpertsLinear):
            experts, output_dims, _ = module.weight.shape
            linear = ExpertsLinear(experts, module.scales.shape[-1] * module.group_size, output_dims)
            linear.weight = dequantized_weight(module, dtype)
            replaced.append((path, linear))
        elif isinstance(module, nn.QuantizedEmbedding):
            weight = dequantized_weight(module, dtype)
            embedding = nn.Embedding(*weight.shape)
            embedding.weight = weight
            replaced.append((path, embedding))
    for _, module in replaced:  # frozen, as the quantized layers were
        module.freeze()
    model.update_modules(tree_unflatten(replaced))
