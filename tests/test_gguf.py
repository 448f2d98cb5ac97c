"""fuse.py --export-gguf for each family llama.cpp has an architecture for (models.GGUF_ARCHS): the tensors are
those gguf's constants list for the architecture; llama.cpp itself (llama-cpp-python, where installed) computes
the adapted model's logits from the file (and from the base's file with the adapters' LoRA file,
--export-gguf-adapter), and splits texts into the tokenizer's tokens (byte-level BPE with each pre-tokenizer
written, SentencePiece); what it would compute otherwise is refused in one line."""
import json
import re

import gguf
import numpy as np
import pytest
from conftest import ROOT, TINY, logits, random_adapter, run_fuse
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import models
import utils
from utils import UserError

PROMPT = "Q: the team when year is 7\nA: SELECT team FROM t WHERE year = 7 AND score = 12"
# model_type (with a suffix where one family has several rows): its config, beyond conftest's TINY. Sequences are
# longer than the sliding windows, and sizes differ where a mix-up would show (head_dim, the experts' widths).
# transformers' Qwen2 tokenizer adds a token (<|endoftext|>) to conftest's 300: an embedding row for it.
CONFIGS_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}
CONFIGS = {
    "llama": {},
    "llama-llama3-rope": {"model_type": "llama", "rope_scaling": CONFIGS_LLAMA3_ROPE},
    "mistral": {"head_dim": 32, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {"tie_word_embeddings": True, "vocab_size": 301},
    "qwen3": {"head_dim": 32, "vocab_size": 301},
    "qwen2_moe": {"vocab_size": 301, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 96},
    "qwen3_moe": {"vocab_size": 301, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "head_dim": 32,
                  "norm_topk_prob": True},
    "gemma": {"head_dim": 32},
    "gemma2": {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8, "final_logit_softcapping": 5.0,
               "attn_logit_softcapping": 3.0},
    "gemma3_text": {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8, "sliding_window_pattern": 2,
                    "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_local_base_freq": 100.0},
    "phi3": {},
    # llama.cpp takes the long factors where its context (a multiple of 256) is longer than the original
    "phi3-longrope": {"model_type": "phi3", "original_max_position_embeddings": 256, "max_position_embeddings": 1024,
                      "rope_scaling": {
        "type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0, 2.5], "long_factor": [2.0] * 8}},
    "olmo2": {},
    "olmo3": {"sliding_window": 8},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.1,
                "logits_scaling": 4.0},
    "starcoder2": {},
    "cohere": {"logit_scale": 0.5},
    "cohere2": {"sliding_window": 8, "logit_scale": 0.5},
    "glm4": {"head_dim": 16},
    "smollm3": {"no_rope_layer_interval": 4},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32, "num_key_value_heads": 4},
    "seed_oss": {"head_dim": 32, "attention_bias": True},
    "internlm3": {"head_dim": 32, "qkv_bias": True, "bias": True},
    "ernie4_5": {"head_dim": 32},
    "exaone4": {"head_dim": 16, "sliding_window": None, "layer_types": ["full_attention"] * 4,  # the 1.2B's
                "rope_scaling": CONFIGS_LLAMA3_ROPE},
    # the 32B's: a window in 64 layers, and rope in the sliding layers alone
    # vision-language models: their language model (conftest's VISION_LANGUAGE)
    "gemma3": {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8, "sliding_window_pattern": 2},
    "mistral3": {"head_dim": 32},
    "exaone4-64-layers": {"model_type": "exaone4", "head_dim": 16, "num_hidden_layers": 64, "sliding_window": 8,
                          "sliding_window_pattern": 4},
}


def model_type(row):
    """The family of the row's language model."""
    row_type = CONFIGS[row].get("model_type", row)
    return models.FAMILIES[row_type].text_types[0] if models.FAMILIES[row_type].text_types else row_type


def test_every_architecture_has_a_row_and_the_readme_names_it():
    assert {model_type(row) for row in CONFIGS} == set(models.GGUF_ARCHS)
    readme = (ROOT / "README.md").read_text().split("`fuse.py --export-gguf` writes", 1)[1].split(";")[0]
    assert set(re.findall(r"\w+", readme)) >= set(models.GGUF_ARCHS)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def random_model(row):
    """Our model of the row's config, with random weights (no checkpoint: names and shapes are what matter)."""
    config = {"model_type": row, **TINY, "vocab_size": 300, **CONFIGS[row]}
    if model_type(row) != config["model_type"]:
        config = {"model_type": config.pop("model_type"), "text_config": config}
    return models.make_model(models.ModelArgs.from_config(config))


# tensors that llama.cpp's architectures list, and read where the model has them
OPTIONAL = {gguf.MODEL_TENSOR.OUTPUT, gguf.MODEL_TENSOR.ROPE_FREQS, gguf.MODEL_TENSOR.ROPE_FACTORS_LONG,
            gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, gguf.MODEL_TENSOR.ATTN_ROT_EMBD}
# and one architecture's: Command R's q/k norms, which llama.cpp reads in models of 64 layers (Command R+)
OPTIONAL_IN = {gguf.MODEL_ARCH.COMMAND_R: {gguf.MODEL_TENSOR.ATTN_Q_NORM, gguf.MODEL_TENSOR.ATTN_K_NORM}}
# the attention's q, k and v in one tensor or three; the feed-forward block an MLP or experts: one of each
EITHER = [({gguf.MODEL_TENSOR.ATTN_QKV},
           {gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K, gguf.MODEL_TENSOR.ATTN_V}),
          ({gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP, gguf.MODEL_TENSOR.FFN_DOWN},
           {gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP,
            gguf.MODEL_TENSOR.FFN_DOWN_EXP})]


@pytest.mark.parametrize("row", list(CONFIGS))
def test_tensors_are_the_architectures(row, tokenizer, tmp_path):
    """Every tensor written is one that gguf's MODEL_TENSORS lists for the architecture, and every one it lists is
    there, in every layer (but the optional ones and the alternatives not taken); norms, biases and routers are
    float32, the other matrices float16."""
    model = random_model(row)
    utils.write_gguf(tmp_path / "model.gguf", model, tokenizer)
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items()
                if name == reader.fields["general.architecture"].contents())
    listed = {gguf.TENSOR_NAMES[t]: t for t in gguf.MODEL_TENSORS[arch]}
    written = {}  # kind: the layers (None: outside them) that have it
    for tensor in reader.tensors:
        base, _, kind = tensor.name.rpartition(".")
        layer = int(base.split(".")[1]) if base.startswith("blk.") else None
        base = base if layer is None else base.replace(f"blk.{layer}.", "blk.{bid}.", 1)
        assert base in listed and kind in ("weight", "bias"), tensor.name
        written.setdefault(listed[base], set()).add(layer)
        float32 = (tensor.data.ndim == 1 or base.endswith(("norm", "ffn_gate_inp", "ffn_gate_inp_shexp"))
                   or kind == "bias")
        assert tensor.tensor_type.name == ("F32" if float32 else "F16"), tensor.name
    required = (set(gguf.MODEL_TENSORS[arch]) - OPTIONAL - OPTIONAL_IN.get(arch, set())
                - {t for t in listed.values() if "nextn" in gguf.TENSOR_NAMES[t]})
    for one, other in EITHER:
        required -= (other if one & set(written) else one) & required
    assert required <= set(written), required - set(written)
    layers = set(range(model.args.num_hidden_layers))
    for kind in required:
        assert written[kind] == ({None} if "{bid}" not in gguf.TENSOR_NAMES[kind] else layers), kind


def test_gemma_norms_are_shifted_in_float32(tokenizer, tmp_path):
    """Gemma's norm weights plus one, as llama.cpp scales by them: added in float32, where bfloat16 (the hub's
    checkpoints) would round 1.01 to 1.0078."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    model = random_model("gemma")
    model.update(tree_unflatten([(k, mx.full(v.shape, 0.01) if "norm" in k else v)
                                 for k, v in tree_flatten(model.parameters())]))
    model.set_dtype(mx.bfloat16)
    utils.write_gguf(tmp_path / "model.gguf", model, tokenizer)
    norms = [t.data for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors if t.name.endswith("norm.weight")]
    shifted = 1 + mx.array(0.01, mx.bfloat16).item()
    assert len(norms) == 9 and all(np.allclose(n, shifted, rtol=0, atol=1e-6) for n in norms)


def test_llama_files_read_back(tokenizer, tmp_path):
    """The llama architecture's files load here too (read_gguf): with the head size of their keys, which may differ
    from hidden_size / num_attention_heads (Mistral Nemo), and their rope scaling."""
    model = random_model("mistral")
    utils.write_gguf(tmp_path / "model.gguf", model, tokenizer)
    loaded, _, _ = utils.load(str(tmp_path / "model.gguf"))
    tokens = tokenizer.encode(PROMPT)
    assert loaded.args.head_dim == 32
    assert np.abs(logits(loaded, tokens) - logits(model, tokens)).max() < 1e-2


def test_what_llama_cpp_would_compute_otherwise_is_refused(tokenizer, tmp_path):
    """Each a one-line error naming the setting, and no file."""
    cases = {
        "phi": ({"model_type": "phi"},  r"model_type 'phi' is not written as GGUF \(these are: llama, mistral"),
        "gemma2": ({"model_type": "gemma2", "head_dim": 32, "query_pre_attn_scalar": 256},
                   r"query_pre_attn_scalar 256: llama.cpp's gemma2 scales queries by 1/sqrt\(32\)"),
        "qwen2_moe": ({"model_type": "qwen2_moe", "num_experts": 4, "mlp_only_layers": [3]},
                      "layers without experts"),
        "qwen3_moe": ({"model_type": "qwen3_moe", "num_experts": 4, "norm_topk_prob": False},
                      "norm_topk_prob False"),
        "smollm3": ({"model_type": "smollm3", "no_rope_layer_interval": 2}, "no_rope_layers"),
        "yarn": ({"model_type": "qwen3", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                 "rope scaling 'yarn' is not written as GGUF for qwen3"),
        "granite": ({"model_type": "llama", "logits_scaling": 4.0}, None),
    }
    for name, (config, message) in cases.items():
        model = models.make_model(models.ModelArgs.from_config({**TINY, "vocab_size": 300, **config}))
        if message is None:  # a setting of another family's: not the llama architecture's
            model.args.logits_scale = 0.25
            message = "logits_scale 0.25 is not written as GGUF for llama"
        with pytest.raises(UserError, match=message):
            utils.write_gguf(tmp_path / f"{name}.gguf", model, tokenizer)
        assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("row", list(CONFIGS))
def test_llama_cpp_computes_the_adapted_models_logits(row, make_checkpoint, tmp_path):
    """The fused model's GGUF file in llama.cpp gives the adapted model's logits, to float16's rounding of the
    weights (and of the activations, which llama.cpp's CPU products take in float16): off by at most 10% of the
    logits' standard deviation, 1% on average (measured: 5% and 0.3% at most; a weight named or laid out wrongly,
    a norm not shifted, a scale or window left out is off by about the deviation itself). In a mixture of experts
    that rounding can change a token's choice of experts (seen: one position off by 16%): there at most one
    position may be off by more."""
    llama_cpp = pytest.importorskip("llama_cpp")
    config = dict(CONFIGS[row])
    folder, _ = make_checkpoint(config.pop("model_type", row), **config)
    adapted = random_adapter(folder, tmp_path / "adapters.safetensors", models.FAMILIES[model_type(row)].lora_targets)
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--export-gguf",
             tmp_path / "fused.gguf")
    check_llama_cpp_logits(llama_cpp.Llama(str(tmp_path / "fused.gguf"), n_ctx=64, logits_all=True, verbose=False),
                           adapted, utils.load(str(folder))[1].encode(PROMPT))


def check_llama_cpp_logits(llm, adapted, tokens):
    """llama.cpp's logits (llm: llama_cpp.Llama) are the adapted model's, to test_llama_cpp_computes_the_adapted_
    models_logits' measure."""
    expected = logits(adapted, tokens)[0]
    llm.eval(tokens)
    error = np.abs(np.array(llm.scores[:len(tokens)]) - expected)
    rerouted = 1 if adapted.args.num_local_experts else 0
    assert (error.max(axis=-1) >= 0.1 * expected.std()).sum() <= rerouted, error.max(axis=-1) / expected.std()
    assert error.mean() < 0.01 * expected.std(), error.mean()


def test_adapter_file_is_llama_cpps_lora_layout(make_checkpoint, tmp_path):
    """--export-gguf-adapter writes what llama.cpp's convert_lora_to_gguf.py writes: general.type "adapter",
    adapter.type "lora", adapter.lora.alpha (the scale times the rank), and for each adapted layer, under its
    tensor's name in the base's GGUF file, .lora_a [rank, input] and .lora_b [output, rank] in float32. Applied to
    the base's GGUF tensors as llama.cpp applies them, W + alpha / rank * lora_b @ lora_a (in the file's layout:
    q and k rows permuted for llama.cpp's rope), they give the fused model's GGUF tensors."""
    folder, _ = make_checkpoint("llama")
    random_adapter(folder, tmp_path / "adapters.safetensors")  # every linear layer of the last 2, rank 4, scale 2
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--export-gguf-adapter",
             tmp_path / "adapter.gguf", "--export-gguf", tmp_path / "fused.gguf")
    assert not (tmp_path / "lora_fused_model").exists()
    base, tokenizer, _ = utils.load(str(folder))
    utils.write_gguf(tmp_path / "base.gguf", base, tokenizer)
    reader = gguf.GGUFReader(tmp_path / "adapter.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    lora = {t.name: t.data for t in reader.tensors}
    kinds = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(lora) == {f"blk.{i}.{kind}.weight.lora_{ab}" for i in (2, 3) for kind in kinds for ab in "ab"}
    weights = {name: {t.name: t.data.astype(np.float32) for t in gguf.GGUFReader(tmp_path / name).tensors}
               for name in ("base.gguf", "fused.gguf")}
    for name in {key.rsplit(".", 1)[0] for key in lora}:
        lora_a, lora_b, base = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"], weights["base.gguf"][name]
        assert lora_a.shape == (4, base.shape[1]) and lora_b.shape == (base.shape[0], 4), name
        assert np.abs(base + 8.0 / 4 * lora_b @ lora_a - weights["fused.gguf"][name]).max() < 1e-3, name


# rows of CONFIGS whose adapters llama.cpp applies here: q and k rows permuted (llama), not (qwen2), experts and a
# shared expert (mixtral, qwen2_moe), q, k and v in one tensor (phi3), a vision-language model's language model
ADAPTER_ROWS = ["llama", "qwen2", "mixtral", "qwen2_moe", "phi3", "gemma3"]


@pytest.mark.parametrize("row", ADAPTER_ROWS)
def test_llama_cpp_applies_the_adapter_file(row, make_checkpoint, tmp_path):
    """llama.cpp, given the base model's GGUF file and the adapters' (on every linear layer of the last 2, each
    expert's too), computes the adapted model's logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    config = dict(CONFIGS[row])
    folder, _ = make_checkpoint(config.pop("model_type", row), **config)
    adapted = random_adapter(folder, tmp_path / "adapters.safetensors", ["*"])
    run_fuse("--model", folder, "--adapter-file", tmp_path / "adapters.safetensors", "--export-gguf-adapter",
             tmp_path / "adapter.gguf")
    base, tokenizer, _ = utils.load(str(folder))
    utils.write_gguf(tmp_path / "base.gguf", base, tokenizer)
    check_llama_cpp_logits(llama_cpp.Llama(str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "adapter.gguf"),
                                           n_ctx=64, logits_all=True, verbose=False), adapted, tokenizer.encode(PROMPT))


@pytest.fixture(scope="module", params=["first", "never"])
def sentencepiece_tokenizer(request, tmp_path_factory):
    """A SentencePiece BPE tokenizer with byte fallback, trained here and converted by transformers: Llama 2's
    kind (a space before the text: prepend_scheme "first"), and Gemma's (none)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from tokenizers.pre_tokenizers import Metaspace

    folder = tmp_path_factory.mktemp("sentencepiece")
    # English enough that the merges' order matters (a token's score)
    sentencepiece.SentencePieceTrainer.train(
        input=str(ROOT / "README.md"), model_prefix=str(folder / "tokenizer"), vocab_size=800, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.backend_tokenizer.pre_tokenizer = Metaspace(prepend_scheme=request.param, split=False)
    return tokenizer


TEXTS = [(ROOT / "data" / "README.md").read_text()[:3000], PROMPT, " two  spaces\tand a tab",
         "naïve café: é, ü, 漢字 🦙", "SELECT name\n\nFROM t"]


def test_sentencepiece_tokenizers_read_back(sentencepiece_tokenizer, tmp_path):
    """Written as llama.cpp's "llama" tokenizer (tokens, scores, types), read back by load (transformers' reader
    of GGUF tokenizers): the same tokens."""
    model = models.make_model(models.ModelArgs.from_config({"model_type": "llama", **TINY, "vocab_size": 800}))
    utils.write_gguf(tmp_path / "model.gguf", model, sentencepiece_tokenizer)
    fields = {name: field.contents() for name, field in gguf.GGUFReader(tmp_path / "model.gguf").fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.token_type"][3:5] == [6, 6]  # bytes
    prefixed = sentencepiece_tokenizer.backend_tokenizer.pre_tokenizer.prepend_scheme == "first"
    assert fields["tokenizer.ggml.add_space_prefix"] == prefixed
    if prefixed:  # transformers' reader knows no tokenizer without the space
        _, tokenizer, _ = utils.load(str(tmp_path / "model.gguf"))
        for text in TEXTS:
            assert tokenizer.encode(text) == sentencepiece_tokenizer.encode(text), text


def test_merges_that_are_not_sentencepieces_are_refused(tmp_path):
    """A BPE tokenizer with byte fallback whose merges llama.cpp's SentencePiece tokenizer would not follow: "abc"
    from "ab" + "c", not from "a" + "bc", which llama.cpp would merge too."""
    from tokenizers.models import BPE

    vocab = {"<unk>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "bc": 5, "abc": 6}
    bpe = BPE(vocab, [("a", "b"), ("b", "c"), ("ab", "c")], unk_token="<unk>", byte_fallback=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(bpe))
    model = models.make_model(models.ModelArgs.from_config({"model_type": "llama", **TINY, "vocab_size": 300}))
    with pytest.raises(UserError, match="the tokenizer's merges lack 'a' \\+ 'bc': a BPE tokenizer with byte fallback"):
        utils.write_gguf(tmp_path / "model.gguf", model, tokenizer)
    assert not list(tmp_path.iterdir())


def test_llama_cpp_tokenizes_sentencepiece_alike(sentencepiece_tokenizer, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = models.make_model(models.ModelArgs.from_config({"model_type": "llama", **TINY, "vocab_size": 800}))
    utils.write_gguf(tmp_path / "model.gguf", model, sentencepiece_tokenizer)
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), vocab_only=True, verbose=False)
    # but before a text that starts with a space, where Metaspace adds none and llama.cpp (as SentencePiece) one
    prefixed = sentencepiece_tokenizer.backend_tokenizer.pre_tokenizer.prepend_scheme == "first"
    for text in (t.lstrip() for t in TEXTS) if prefixed else TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False) == sentencepiece_tokenizer.encode(
            text, add_special_tokens=False), text


def byte_level_tokenizer(pre_tokenizer: str):
    """A byte-level BPE tokenizer trained on the README, splitting words as the pre-tokenizer of that name in
    llama.cpp does (utils.GGUF_PRE_TOKENIZERS)."""
    from tokenizers import Regex, pre_tokenizers, trainers
    from tokenizers.models import BPE

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = {"llama-bpe": utils.WORDS_LLAMA3, "dbrx": utils.WORDS_LLAMA3,
             "qwen2": utils.WORDS_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")}.get(pre_tokenizer)
    tokenizer = Tokenizer(BPE(ignore_merges=pre_tokenizer == "llama-bpe"))
    tokenizer.pre_tokenizer = {
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        "whitespace": pre_tokenizers.Whitespace(),
    }.get(pre_tokenizer) or pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(ROOT / "README.md")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


BYTE_LEVEL_TEXTS = TEXTS + ["I'm sure they'll pay 1234567 or 3.14159, won't they?\n\n\n  x  \r\n"]


@pytest.mark.parametrize("pre_tokenizer", [name for _, name in utils.GGUF_PRE_TOKENIZERS])
def test_llama_cpp_splits_byte_level_texts_alike(pre_tokenizer, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    tokenizer = byte_level_tokenizer(pre_tokenizer)
    model = models.make_model(models.ModelArgs.from_config({"model_type": "llama", **TINY, "vocab_size": 800}))
    utils.write_gguf(tmp_path / "model.gguf", model, tokenizer)
    assert gguf.GGUFReader(tmp_path / "model.gguf").fields["tokenizer.ggml.pre"].contents() == pre_tokenizer
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), vocab_only=True, verbose=False)
    for text in BYTE_LEVEL_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False) == tokenizer.encode(text, add_special_tokens=False), text


def test_other_pre_tokenizers_are_refused(tmp_path):
    model = models.make_model(models.ModelArgs.from_config({"model_type": "llama", **TINY, "vocab_size": 800}))
    with pytest.raises(UserError, match=r"the tokenizer's pre-tokenizer \(Whitespace\) is not one that llama.cpp"):
        utils.write_gguf(tmp_path / "model.gguf", model, byte_level_tokenizer("whitespace"))
