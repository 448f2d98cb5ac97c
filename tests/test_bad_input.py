"""Bad input as a user meets it: each case runs lora.py, convert.py or fuse.py in a subprocess on one bad flag,
data file, model folder, GGUF file, adapter, checkpoint, YAML config, output path or environment variable, and
expects

  1. a non-zero exit code (and no hang: a timeout);
  2. on stderr, one line (tqdm's progress bars aside), "<script>.py: error: ...";
  3. no traceback on stdout or stderr;
  4. that line naming the flag or file at fault;
  5. every file the case was given, and every file of the shared inputs, left as it was (a lock file,
     ".*.lock", may come and go).
"""
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import ROOT, sql_texts, write_gguf, write_jsonl

TIMEOUT = 120  # s per script run; a hang fails the case
# one short training run, whose adapters, checkpoints and metrics.jsonl the adapter and resume cases damage
TRAIN_RUN = ["--train", "--iters", 4, "--save-every", 2, "--lora-layers", 2, "--batch-size", 4, "--lora-rank", 4,
             "--eval-on-start", "--steps-per-eval", 1000, "--val-batches", 1]
RUN_ADAPTERS = "run/adapters.safetensors"  # relative to the cwd: a copied run is resumed with the same flags
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def script(name, *flags, cwd, env=None):
    return subprocess.run([sys.executable, str(ROOT / name), *map(str, flags)], cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, env=env and {**os.environ, **env})


def chats(n, content="a question"):
    return [{"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": t}]}
            for t in sql_texts(n)]


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


class World:
    """The inputs cases share, made once: a tiny llama folder (and a copy with a chat template, and a tiny
    mixtral: a mixture of experts), data, GGUF files; the short training run (and its PEFT export and .npz copy)
    on first use. Cases read these and copy what they damage."""

    def __init__(self, root, folder, reference, moe):
        from gguf import GGMLQuantizationType as T

        self.root = root
        self.model = root / "model"
        shutil.copytree(folder, self.model)
        self.moe = root / "moe"
        shutil.copytree(moe, self.moe)
        self.data = root / "data"
        self.data.mkdir()
        for split, n, seed in [("train", 64, 1), ("valid", 16, 2), ("test", 16, 3)]:
            write_jsonl(self.data / f"{split}.jsonl", sql_texts(n, seed))
        self.chat_model = root / "chat_model"
        shutil.copytree(self.model, self.chat_model)
        edit_json(self.chat_model / "tokenizer_config.json", lambda c: dict(c, chat_template=CHAT_TEMPLATE))
        self.chat_data = root / "chat_data"
        self.chat_data.mkdir()
        for split in ("train", "valid", "test"):
            write_records(self.chat_data / f"{split}.jsonl", chats(16))

        import gguf

        class WithWeird(gguf.GGUFWriter):  # one more tensor, whose name the loader does not know
            def write_header_to_file(self, *args, **kwargs):
                self.add_tensor("blk.0.attn_weird.weight", np.zeros((4, 64), np.float32))
                super().write_header_to_file(*args, **kwargs)

        class Gpt2(gguf.GGUFWriter):  # general.architecture "gpt2" (and its keys gpt2.*)
            def __init__(self, path, arch, *args, **kwargs):
                super().__init__(path, "gpt2", *args, **kwargs)

        self.gguf = root / "tiny.gguf"
        write_gguf(self.gguf, self.model, reference, T.F16)
        self.gguf_weird, self.gguf_gpt2 = root / "weird_tensor.gguf", root / "gpt2_arch.gguf"
        for path, writer in ((self.gguf_weird, WithWeird), (self.gguf_gpt2, Gpt2)):  # conftest's write_gguf, altered
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(gguf, "GGUFWriter", writer)
                write_gguf(path, self.model, reference, T.F16)
        self.reference = reference  # the torch model, for GGUF files of other weights
        self._trained = None

    def trained(self):
        """The training run's folder (run/), its PEFT export (peft/) and its adapters as .npz (npz/)."""
        if self._trained is None:
            self._trained = "failed"
            result = script("lora.py", "--model", self.model, "--data", self.data, *TRAIN_RUN,
                            "--adapter-file", RUN_ADAPTERS, cwd=self.root)
            assert result.returncode == 0, result.stderr[-2000:]
            run = self.root / "run"
            result = script("fuse.py", "--model", self.model, "--adapter-file", run / "adapters.safetensors",
                            "--export-peft", self.root / "peft", cwd=self.root)
            assert result.returncode == 0, result.stderr[-2000:]
            (self.root / "npz").mkdir()
            mx.savez(str(self.root / "npz" / "adapters.npz"), **mx.load(str(run / "adapters.safetensors")))
            shutil.copy(run / "adapter_config.json", self.root / "npz")
            self._trained = run
        assert self._trained != "failed", "the training run failed (see the first case that needed it)"
        return self._trained

    @property
    def adapters(self):
        return self.trained() / "adapters.safetensors"

    @property
    def peft(self):
        self.trained()
        return self.root / "peft"

    @property
    def npz(self):
        self.trained()
        return self.root / "npz"


@pytest.fixture(scope="session")
def world(make_checkpoint, tmp_path_factory):
    folder, reference = make_checkpoint("llama")
    moe, _ = make_checkpoint("mixtral", num_local_experts=4, num_experts_per_tok=2)
    return World(tmp_path_factory.mktemp("world"), folder, reference, moe)


# --- damage -------------------------------------------------------------------------------------------------

def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def random_bytes(path, n=4096):
    path.write_bytes(random.Random(0).randbytes(n))


def copy(src, dst):
    (shutil.copytree if Path(src).is_dir() else shutil.copy)(src, dst)
    return dst


def rewrite_weights(folder, change):
    """model.safetensors rewritten with change(weights) (a dict of name: array)."""
    path = folder / "model.safetensors"
    weights = dict(mx.load(str(path)))
    change(weights)
    mx.save_safetensors(str(path), weights, metadata={"format": "pt"})


# --- the command lines --------------------------------------------------------------------------------------

def train(w, d, *more, model=None, data=None):
    """A short training run into d/out; `more` comes last, so that a flag given there wins."""
    return ["--model", model or w.model, "--data", data or w.data, "--train", "--iters", 2, "--batch-size", 4,
            "--lora-layers", 2, "--lora-rank", 4, "--eval-on-start", "--steps-per-eval", 1000, "--val-batches", 1,
            "--adapter-file", d / "out" / "adapters.safetensors", *more]


def on_test_set(w, d, *more, model=None, adapter=None):
    """--test on one batch (with --adapter-file if given, else the base model)."""
    return ["--model", model or w.model, "--data", w.data, "--test", "--test-batches", 1,
            *(["--adapter-file", adapter] if adapter else []), *more]


def prompt(w, d, *more, model=None, adapter=None):
    return ["--model", model or w.model, "--prompt", "Q: the", "--max-tokens", 4,
            *(["--adapter-file", adapter] if adapter else []), *more]


def nowhere(d):
    """A --model that does not exist: a flag's error must come before any model is read."""
    return d / "no_model"


# --- A. flags -----------------------------------------------------------------------------------------------

# (id, mode, flag, value, the model missing): each value out of range for its flag
FLAGS = [
    ("batch-size-zero", train, "--batch-size", 0, True),
    ("batch-size-negative", train, "--batch-size", -1, False),
    ("batch-size-not-a-number", train, "--batch-size", "four", True),
    ("iters-zero", train, "--iters", 0, False),
    ("iters-negative", train, "--iters", -5, True),
    ("epochs-zero", train, "--epochs", 0, False),
    ("optimizer-unknown", train, "--optimizer", "rmsprop", True),
    ("early-stopping-patience-zero", train, "--early-stopping-patience", 0, False),
    ("early-stopping-threshold-negative", train, "--early-stopping-threshold", -0.1, True),  # with a patience
    ("lora-rank-zero", train, "--lora-rank", 0, False),
    ("lora-layers-zero", train, "--lora-layers", 0, True),
    ("lora-layers-negative", train, "--lora-layers", -2, False),
    ("lora-layers-more-than-the-model", train, "--lora-layers", 9, False),  # the model has 4
    ("learning-rate-negative", train, "--learning-rate", -1, True),
    ("learning-rate-zero", train, "--learning-rate", 0, False),
    ("learning-rate-nan", train, "--learning-rate", "nan", True),
    ("save-every-zero", train, "--save-every", 0, False),
    ("steps-per-report-zero", train, "--steps-per-report", 0, True),
    ("steps-per-eval-zero", train, "--steps-per-eval", 0, False),
    ("val-batches-negative", train, "--val-batches", -2, True),
    ("test-batches-zero", on_test_set, "--test-batches", 0, False),
    ("max-seq-length-zero", train, "--max-seq-length", 0, True),
    ("lora-dropout-above-one", train, "--lora-dropout", 1.5, False),
    ("lora-dropout-negative", train, "--lora-dropout", -0.1, True),
    ("lora-scale-zero", train, "--lora-scale", 0, False),
    ("lora-alpha-negative", train, "--lora-alpha", -1, True),
    ("temp-negative", prompt, "--temp", -1, False),
    ("top-p-zero", prompt, "--top-p", 0, True),
    ("top-p-above-one", prompt, "--top-p", 1.5, False),
    ("top-k-negative", prompt, "--top-k", -1, True),
    ("min-p-one", prompt, "--min-p", 1, False),
    ("max-tokens-zero", prompt, "--max-tokens", 0, False),
    ("warmup-negative", train, "--warmup", -1, True),
    ("grad-accumulation-steps-zero", train, "--grad-accumulation-steps", 0, False),
    ("max-grad-norm-zero", train, "--max-grad-norm", 0, True),
    ("keep-checkpoints-negative", train, "--keep-checkpoints", -1, False),
    ("weight-decay-negative", train, "--weight-decay", -1, True),  # with --optimizer adamw, below
    ("lora-plus-ratio-zero", train, "--lora-plus-ratio", 0, True),
    ("lora-plus-ratio-nan", train, "--lora-plus-ratio", "nan", False),
    ("init-lora-weights-unknown", train, "--init-lora-weights", "svd", True),
    ("init-lora-weights-niter-zero", train, "--init-lora-weights", "pissa_niter_0", False),
    ("seed-negative", train, "--seed", -1, False),
    ("generate-eval-negative", on_test_set, "--generate-eval", -1, True),  # with --completion-marker, below
    ("add-eos-token-two", train, "--add-eos-token", 2, False),
    ("unknown-flag", train, "--lora-rnk", 4, True),
    ("train-mode-unknown", train, "--train-mode", "ppo", False),
    ("beta-zero", train, "--beta", 0, True),  # with --train-mode dpo, below
    ("beta-negative", train, "--beta", -0.1, False),
    ("desirable-weight-zero", train, "--desirable-weight", 0, True),  # with --train-mode kto, below
    ("undesirable-weight-negative", train, "--undesirable-weight", -1, False),
    ("simpo-gamma-negative", train, "--simpo-gamma", -1, True),  # with --train-mode simpo, below
    ("cpo-alpha-negative", train, "--cpo-alpha", -0.5, False),
    ("label-smoothing-half", train, "--label-smoothing", 0.5, True),
    ("loss-type-unknown", train, "--loss-type", "kto", False),  # with --train-mode dpo, below
    ("lora-rank-above-the-layers-features", train, "--lora-rank", 65, False),  # q_proj and v_proj have 64 inputs
    ("lora-rank-huge", train, "--lora-rank", 10**8, False),
    ("prompt-empty", prompt, "--prompt", "", True),
    ("prompt-not-utf8", prompt, "--prompt", "Q: \udcff\udcfe", True),  # the bytes 0xff 0xfe, as Python passes them
    ("prompt-longer-than-the-context", prompt, "--prompt", "Q " * 200, False),  # 400 tokens; the context is 256
    ("completion-marker-spaces", on_test_set, "--completion-marker", " ", True),
]
# flags that are wrong together
CASES_TOGETHER = [
    ("accept-flag-changes-without-resume", ["--accept-flag-changes"], "--accept-flag-changes"),
    ("weight-decay-with-adam", ["--weight-decay", 0.1], "--weight-decay"),
    ("epochs-with-iters", ["--epochs", 2], "--epochs"),  # train() gives --iters
    ("early-stopping-threshold-without-patience", ["--early-stopping-threshold", 0.1], "--early-stopping-threshold"),
    ("early-stopping-without-validation", ["--early-stopping-patience", 2, "--val-batches", 0],
     "--early-stopping-patience"),
    ("use-rslora-without-lora-alpha", ["--use-rslora"], "--use-rslora"),
    ("lora-plus-ratio-with-full", ["--fine-tune-type", "full", "--lora-plus-ratio", 16], "--lora-plus-ratio"),
    ("init-lora-weights-with-dora", ["--fine-tune-type", "dora", "--init-lora-weights", "pissa"],
     "--init-lora-weights"),
    ("resume-with-resume-adapter-file", ["--resume", "x", "--resume-adapter-file", "y"], "--resume"),
    ("beta-without-a-preference-mode", ["--beta", 0.1], "--beta"),
    ("desirable-weight-with-dpo", ["--train-mode", "dpo", "--desirable-weight", 2], "--desirable-weight"),
    ("simpo-gamma-with-cpo", ["--train-mode", "cpo", "--simpo-gamma", 1], "--simpo-gamma"),
    ("loss-type-with-orpo", ["--train-mode", "orpo", "--loss-type", "ipo"], "--loss-type"),
    ("label-smoothing-with-dpo-sigmoid", ["--train-mode", "dpo", "--label-smoothing", 0.1], "--label-smoothing"),
]
# what else the flag needs, so that its value is the only fault
NEEDS = {"--weight-decay": ["--optimizer", "adamw"], "--generate-eval": ["--completion-marker", "A: "],
         "--beta": ["--train-mode", "dpo"], "--completion-marker": ["--generate-eval", 1],
         "--desirable-weight": ["--train-mode", "kto"], "--undesirable-weight": ["--train-mode", "kto"],
         "--simpo-gamma": ["--train-mode", "simpo"], "--cpo-alpha": ["--train-mode", "cpo"],
         "--label-smoothing": ["--train-mode", "cpo"], "--loss-type": ["--train-mode", "dpo"],
         "--early-stopping-threshold": ["--early-stopping-patience", 2]}


@dataclass
class Case:
    id: str
    script: str
    args: Callable  # (world, case folder) -> the flags; it makes (damaged copies of) the inputs there
    expect: str  # the error line names this: the flag or file at fault
    never: tuple = ()  # files (in the case folder) that must never appear
    env: Callable = lambda w, d: {}  # (world, case folder) -> environment variables the script runs with
    in_training: bool = False  # the fault shows while training: the run's folder (out/runs/) may be made


def flag_case(name, mode, flag, value, missing):
    def args(w, d):
        return mode(w, d, flag, value, *NEEDS.get(flag, []), model=nowhere(d) if missing else None)

    return Case(f"flag-{name}", "lora.py", args, flag)


CASES = [flag_case(*row) for row in FLAGS] + [
    Case(f"flags-{name}", "lora.py", lambda w, d, more=more: train(w, d, *more, model=nowhere(d)), expect)
    for name, more, expect in CASES_TOGETHER] + [
    Case("flag-convert-max-shard-size-zero", "convert.py",
         lambda w, d: ["--hf-path", w.model, "--mlx-path", d / "out", "--max-shard-size", 0], "--max-shard-size"),
    Case("flag-convert-max-shard-size-negative", "convert.py",
         lambda w, d: ["--hf-path", nowhere(d), "--mlx-path", d / "out", "--max-shard-size", -1], "--max-shard-size"),
    Case("flag-convert-max-shard-size-nan", "convert.py",
         lambda w, d: ["--hf-path", w.model, "--mlx-path", d / "out", "--max-shard-size", "nan"], "--max-shard-size"),
    Case("flag-convert-q-bits-7", "convert.py",
         lambda w, d: ["--hf-path", w.model, "--mlx-path", d / "out", "-q", "--q-bits", 7], "--q-bits"),
    Case("flag-convert-q-group-size-16", "convert.py",
         lambda w, d: ["--hf-path", nowhere(d), "--mlx-path", d / "out", "-q", "--q-group-size", 16],
         "--q-group-size"),
    Case("flag-convert-dtype-float64", "convert.py",
         lambda w, d: ["--hf-path", w.model, "--mlx-path", d / "out", "--dtype", "float64"], "--dtype"),
    Case("flag-fuse-unknown-flag", "fuse.py",
         lambda w, d: ["--model", w.model, "--adapter-file", w.adapters, "--save-pth", d / "out"], "--save-pth"),
]


# --- B. data files ------------------------------------------------------------------------------------------

def data(train_content, valid=True, flags=(), chat=False):
    """A short training run on --data d/data, whose train.jsonl holds train_content (bytes, str or a function
    of the path), with good valid and test sets (no valid.jsonl for valid=False); chats on the model with a
    chat template."""
    def args(w, d):
        folder = d / "data"
        folder.mkdir()
        for split in ("valid", "test") if valid else ("test",):
            if chat:
                write_records(folder / f"{split}.jsonl", chats(8))
            else:
                write_jsonl(folder / f"{split}.jsonl", sql_texts(8, 5))
        path = folder / "train.jsonl"
        if callable(train_content):
            train_content(path)
        elif isinstance(train_content, bytes):
            path.write_bytes(train_content)
        else:
            path.write_text(train_content)
        return train(w, d, *flags, data=folder, model=w.chat_model if chat else None)

    return args


def bad_test_set(w, d):
    folder = copy(w.data, d / "data")
    (folder / "test.jsonl").write_text('{"text": \n')
    return on_test_set(w, d, "--data", folder)


def empty_prompt_test_set(w, d):
    """--generate-eval on a test set whose first prompt is empty: nothing to generate from."""
    folder = copy(w.data, d / "data")
    write_records(folder / "test.jsonl", [{"prompt": "", "completion": "SELECT"}, {"prompt": "Q", "completion": "A"}])
    return on_test_set(w, d, "--data", folder, "--generate-eval", 2)


GOOD = "".join(json.dumps({"text": t}) + "\n" for t in sql_texts(8))
GOOD_CHATS = "".join(json.dumps(c) + "\n" for c in chats(8))


def chat_line(messages):
    return GOOD_CHATS + json.dumps({"messages": messages}) + "\n"


PAIRS = "".join(json.dumps({"prompt": t.split("A: ")[0] + "A: ", "chosen": t.split("A: ")[1], "rejected": "SELECT"})
                + "\n" for t in sql_texts(8))
DPO = ("--train-mode", "dpo", "--val-batches", 0)  # a preference run on train.jsonl alone
UNPAIRED = "".join(json.dumps({"prompt": t.split("A: ")[0] + "A: ", "completion": t.split("A: ")[1],
                               "label": i % 2 == 0}) + "\n" for i, t in enumerate(sql_texts(8)))
KTO = ("--train-mode", "kto", "--val-batches", 0)


CASES += [
    Case("data-train-not-utf8", "lora.py", data(GOOD.encode() + b'{"text": "caf\xff\xfe"}\n'), "train.jsonl"),
    Case("data-train-invalid-json-line-3", "lora.py",
         data("\n".join(GOOD.splitlines()[:2] + ['{"text": "unterminated'] + GOOD.splitlines()[2:]) + "\n"),
         "train.jsonl:3"),
    Case("data-train-json-array-line-2", "lora.py",
         data(GOOD.splitlines()[0] + '\n["Q: a", "A: b"]\n' + GOOD), "train.jsonl:2"),
    Case("data-train-json-string-line", "lora.py", data(GOOD + '"just a string"\n'), "train.jsonl"),
    Case("data-train-text-not-a-string", "lora.py", data(GOOD + '{"text": 5}\n'), "train.jsonl"),
    Case("data-train-empty", "lora.py", data(""), "train.jsonl"),
    Case("data-train-blank-lines-only", "lora.py", data("\n\n   \n\t\n"), "train.jsonl"),
    Case("data-train-random-bytes", "lora.py", data(random_bytes), "train.jsonl"),
    Case("data-train-mixed-formats-line-2", "lora.py",
         data(GOOD.splitlines()[0] + "\n" + json.dumps({"prompt": "Q", "completion": "A"}) + "\n" + GOOD),
         "train.jsonl:2"),
    Case("data-train-completion-not-a-string", "lora.py",
         data("".join(json.dumps({"prompt": "Q", "completion": c}) + "\n" for c in ["A", "B", "C", "D", None])),
         "train.jsonl"),
    Case("data-chat-content-a-number", "lora.py",
         data(chat_line([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]), chat=True),
         "train.jsonl"),
    Case("data-chat-content-null", "lora.py",
         data(chat_line([{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]), chat=True),
         "train.jsonl"),
    Case("data-chat-message-without-role", "lora.py",
         data(chat_line([{"content": "q"}, {"role": "assistant", "content": "x"}]), chat=True), "train.jsonl"),
    Case("data-train-is-a-folder", "lora.py", data(lambda p: p.mkdir()), "train.jsonl"),
    Case("data-valid-missing", "lora.py", data(GOOD, valid=False), "valid.jsonl"),
    Case("data-mask-prompt-on-text", "lora.py", data(GOOD, flags=["--mask-prompt"]), "train.jsonl"),
    Case("data-test-invalid-json", "lora.py", bad_test_set, "test.jsonl"),
    Case("data-preference-pairs-in-an-sft-run", "lora.py", data(PAIRS), "train.jsonl:1"),
    Case("data-sft-examples-in-a-dpo-run", "lora.py", data(GOOD, valid=False, flags=DPO), "train.jsonl:1"),
    Case("data-pair-without-rejected-line-9", "lora.py",
         data(PAIRS + json.dumps({"prompt": "Q", "chosen": "A"}) + "\n", valid=False, flags=DPO), "train.jsonl:9"),
    Case("data-pair-chat-response-from-the-user", "lora.py",
         data(json.dumps({"prompt": [{"role": "user", "content": "q"}],
                          "chosen": [{"role": "assistant", "content": "a"}],
                          "rejected": [{"role": "user", "content": "b"}]}) + "\n", valid=False, flags=DPO),
         "train.jsonl:1"),
    Case("data-pairs-fewer-than-the-batch", "lora.py",
         data("".join(PAIRS.splitlines(keepends=True)[:3]), valid=False, flags=DPO), "train.jsonl"),
    Case("data-sft-valid-set-in-an-orpo-run", "lora.py",
         data(PAIRS, flags=["--train-mode", "orpo"]), "valid.jsonl:1"),
    Case("data-mask-prompt-chat-without-assistant-line-9", "lora.py",
         data(chat_line([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]), chat=True,
              flags=["--mask-prompt"]), "train.jsonl:9"),
    Case("data-text-and-messages-line-9", "lora.py",
         data(GOOD + json.dumps({"text": "x", **chats(1)[0]}) + "\n", chat=True), "train.jsonl:9"),
    Case("data-pair-and-messages-in-a-dpo-run", "lora.py",
         data(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", **chats(1)[0]}) + "\n", valid=False, flags=DPO),
         "train.jsonl:1"),
    Case("data-pair-chosen-equals-rejected-line-9", "lora.py",
         data(PAIRS + json.dumps({"prompt": "Q", "chosen": "A", "rejected": "A"}) + "\n", valid=False, flags=DPO),
         "train.jsonl:9"),
    Case("data-train-integer-of-5000-digits-line-9", "lora.py",
         data(GOOD + '{"text": "a", "n": ' + "9" * 5000 + "}\n"), "train.jsonl:9"),
    Case("data-generate-eval-empty-prompt", "lora.py", empty_prompt_test_set, "test.jsonl:1"),
    Case("data-kto-label-not-a-boolean-line-9", "lora.py",
         data(UNPAIRED + json.dumps({"prompt": "Q", "completion": "A", "label": "yes"}) + "\n", valid=False,
              flags=KTO), "train.jsonl:9"),
    Case("data-kto-without-a-label-line-9", "lora.py",
         data(UNPAIRED + json.dumps({"prompt": "Q", "completion": "A"}) + "\n", valid=False, flags=KTO),
         "train.jsonl:9"),
    Case("data-kto-empty-completion-line-9", "lora.py",
         data(UNPAIRED + json.dumps({"prompt": "Q", "completion": "", "label": True}) + "\n", valid=False,
              flags=KTO), "train.jsonl:9"),
    Case("data-preference-pairs-in-a-kto-run", "lora.py", data(PAIRS, valid=False, flags=KTO), "train.jsonl:1"),
    Case("data-kto-examples-in-a-dpo-run", "lora.py", data(UNPAIRED, valid=False, flags=DPO), "train.jsonl:1"),
]

PROMPTS = "".join(json.dumps({"prompt": t.split("A: ")[0] + "A:", "answer": t.split("A: ")[1]}) + "\n"
                  for t in sql_texts(8))
REWARD = "def reward(completions, **columns):\n    return [1.0] * len(completions)\n"


def grpo(reward_code=REWARD, functions="reward", flags=(), train_content=PROMPTS):
    """A short GRPO run on train.jsonl alone (PROMPTS), of the reward functions `functions` of a file d/rewards.py
    that holds reward_code (None: no file)."""
    def args(w, d):
        if reward_code is not None:
            (d / "rewards.py").write_text(reward_code)
        folder = d / "data"
        folder.mkdir()
        (folder / "train.jsonl").write_text(train_content)
        return train(w, d, "--train-mode", "grpo", "--reward-functions", f"{d / 'rewards.py'}:{functions}",
                     "--num-generations", 2, "--max-completion-length", 4, "--val-batches", 0, *flags, data=folder)

    return args


def returning(value):
    """A reward function that returns `value` (Python source, of the completions)."""
    return f"def reward(completions, **columns):\n    return {value}\n"


CASES += [
    Case("grpo-without-reward-functions", "lora.py",
         lambda w, d: train(w, d, "--train-mode", "grpo", "--num-generations", 2, model=nowhere(d)),
         "--reward-functions"),
    Case("grpo-reward-file-missing", "lora.py", grpo(reward_code=None), "no such file"),
    Case("grpo-reward-function-missing", "lora.py", grpo(functions="reward,format"), "has no function format"),
    Case("grpo-reward-file-fails-to-load", "lora.py", grpo("def reward(:\n"), "rewards.py fails to load"),
    Case("grpo-reward-weights-for-other-functions", "lora.py", grpo(flags=["--reward-weights", 1, 2]),
         "--reward-weights"),
    Case("grpo-batch-size-not-a-multiple-of-the-generations", "lora.py", grpo(flags=["--batch-size", 3]),
         "--batch-size"),
    Case("grpo-loss-type-of-dpo", "lora.py", grpo(flags=["--loss-type", "sigmoid"]), "--loss-type"),
    Case("grpo-one-generation", "lora.py", grpo(flags=["--num-generations", 1]), "--num-generations"),
    Case("grpo-empty-prompt-line-9", "lora.py", grpo(train_content=PROMPTS + '{"prompt": ""}\n'), "train.jsonl:9"),
    Case("grpo-completions-in-a-grpo-run", "lora.py", grpo(train_content=UNPAIRED), "train.jsonl:1"),
    Case("grpo-prompt-longer-than-the-limits-line-9", "lora.py",
         grpo(train_content=PROMPTS + json.dumps({"prompt": "Q " * 40}) + "\n",
              flags=["--max-completion-length", 200, "--max-seq-length", 256]), "train.jsonl:9"),
    # (found at the first batch's rewards, in training)
    Case("grpo-reward-raises", "lora.py", grpo("def reward(**columns):\n    raise KeyError('score')\n"),
         "reward raised KeyError", in_training=True),
    Case("grpo-reward-wrong-length", "lora.py", grpo(returning("[1.0]")), "reward returned 1 rewards",
         in_training=True),
    Case("grpo-reward-not-a-list", "lora.py", grpo(returning("1.0")), "reward returned 1.0", in_training=True),
    Case("grpo-reward-nan", "lora.py", grpo(returning("[float('nan')] * len(completions)")), "reward returned nan",
         in_training=True),
    Case("grpo-reward-not-a-number", "lora.py", grpo(returning("['good'] * len(completions)")),
         "reward returned 'good'", in_training=True),
]


def parquet(records, splits=("train", "validation"), flags=()):
    """A short training run on --data d/data, a folder of a parquet file for each split: the train split's rows
    the records, the others' good."""
    def args(w, d):
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = d / "data"
        folder.mkdir()
        for split in splits:
            rows = records if split == "train" else [{"text": t} for t in sql_texts(8, 5)]
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{split}.parquet")
        return train(w, d, *flags, data=folder)

    return args


def damaged_parquet(w, d):
    (d / "data").mkdir()
    random_bytes(d / "data" / "train.parquet")
    return train(w, d, data=d / "data")


def text_file(w, d):
    (d / "notes.txt").write_text("Q: a\nA: b\n")
    return train(w, d, data=d / "notes.txt")


HUB_ID = "no-such-user/no-such-dataset"
TEXTS = [{"text": t} for t in sql_texts(8)]
CASES += [
    Case("data-hub-id-offline", "lora.py", lambda w, d: train(w, d, data=HUB_ID),
         f"--data {HUB_ID}: no such folder or file, and the Hugging Face dataset {HUB_ID} could not be reached",
         env=lambda w, d: {"HF_HUB_OFFLINE": "1"}),
    Case("data-parquet-row-5-not-an-example", "lora.py", parquet(TEXTS[:5] + [{"text": None}] + TEXTS),
         "data (split train) row 5: not an example"),
    Case("data-parquet-without-a-valid-split", "lora.py", parquet(TEXTS, splits=("train",)), "--valid-split: "),
    Case("data-parquet-train-split-unknown", "lora.py", parquet(TEXTS, flags=["--train-split", "training"]),
         "--train-split: "),
    Case("data-parquet-train-split-bad-slice", "lora.py", parquet(TEXTS, flags=["--train-split", "train[:x%]"]),
         "--train-split train[:x%]: "),
    Case("data-parquet-feature-not-a-column", "lora.py", parquet(TEXTS, flags=["--text-feature", "body"]),
         "--text-feature body: "),
    Case("data-parquet-damaged", "lora.py", damaged_parquet, "--data"),
    Case("data-split-flag-on-jsonl-files", "lora.py", lambda w, d: train(w, d, "--train-split", "train[:50%]"),
         "--train-split: "),
    Case("data-a-text-file", "lora.py", text_file, "--data"),
]


# --- C. model folders ---------------------------------------------------------------------------------------

def damaged(w, d, damage, source="model"):
    """A copy of the tiny model (or of the one with a chat template) in d/damaged_model, damaged by
    damage(folder, d)."""
    folder = copy(getattr(w, source), d / "damaged_model")
    damage(folder, d)
    return folder


def model(damage, source="model", data=None):
    """A short training run into d/out on a damaged copy of the model (see damaged)."""
    def args(w, d):
        return train(w, d, model=damaged(w, d, damage, source), data=getattr(w, data) if data else None)

    return args


def text_file_model(w, d):
    (d / "model.txt").write_text("not a model")
    return train(w, d, model=d / "model.txt")


def convert_truncated(w, d):
    return ["--hf-path", damaged(w, d, lambda f, d: truncate(f / "model.safetensors")), "--mlx-path", d / "out"]


def fuse_bad_config(w, d):
    folder = damaged(w, d, lambda f, d: (f / "config.json").write_text("{"))
    return ["--model", folder, "--adapter-file", w.adapters, "--save-path", d / "fused"]


def config(change):
    return lambda folder, d: edit_json(folder / "config.json", change)


def without(key):
    return lambda c: {k: v for k, v in c.items() if k != key}


def config_text(old, new):
    """config.json with `old` in its text replaced: numbers that JSON writers do not write (1e400)."""
    return lambda folder, d: (folder / "config.json").write_text((folder / "config.json").read_text().replace(old, new))


def vocabulary_of_100(folder, d):
    """The model cut to the first 100 tokens of the tokenizer's 300: the tokenizer is not the model's."""
    edit_json(folder / "config.json", lambda c: dict(c, vocab_size=100))
    rewrite_weights(folder, lambda weights: weights.update(
        {k: weights[k][:100] for k in ("model.embed_tokens.weight", "lm_head.weight")}))


def prompt_on(damage, *more):
    """--prompt on a damaged copy of the model (see damaged)."""
    return lambda w, d: prompt(w, d, *more, model=damaged(w, d, damage))


def prompt_beyond_memory(w, d):
    """120,000 tokens in a context of ten million: on the CPU their attention scores would take hundreds of GB."""
    if mx.default_device() != mx.cpu:
        pytest.skip("a GPU's fused attention keeps no scores")
    return prompt_on(config(lambda c: dict(c, max_position_embeddings=10**7)), "--prompt", "~" * 120000)(w, d)


def hostfile(text, rank="0"):
    """The environment of rank `rank` of mlx.launch's ring backend, whose hostfile d/hosts.json holds text."""
    def env(w, d):
        (d / "hosts.json").write_text(text)
        return {"MLX_HOSTFILE": str(d / "hosts.json"), "MLX_RANK": rank}

    return env


TWO_HOSTS = '[["127.0.0.1:47001"], ["127.0.0.1:47002"]]'


EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("code from the model folder ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def evil_tokenizer(folder, d):
    """Remote code in the folder: loading the tokenizer must not run it."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(d / "MARKER")))
    edit_json(folder / "tokenizer_config.json",
              lambda c: dict(c, tokenizer_class="EvilTokenizer",
                             auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}))


CASES += [
    Case("model-no-config", "lora.py", model(lambda f, d: (f / "config.json").unlink()), "config.json"),
    Case("model-config-invalid-json", "lora.py",
         model(lambda f, d: (f / "config.json").write_text('{"model_type": "llama",')), "config.json"),
    Case("model-config-json-list", "lora.py", model(config(lambda c: [c])), "config.json"),
    Case("model-config-not-utf8", "lora.py",
         model(lambda f, d: (f / "config.json").write_bytes(b'{"model_type": "ll\xff\xfeama"}')), "config.json"),
    Case("model-config-hidden-size-a-string", "lora.py", model(config(lambda c: dict(c, hidden_size="big"))),
         "config.json"),
    Case("model-config-no-num-hidden-layers", "lora.py", model(config(without("num_hidden_layers"))), "config.json"),
    Case("model-config-num-hidden-layers-negative", "lora.py",
         model(config(lambda c: dict(c, num_hidden_layers=-1))), "config.json"),
    Case("model-config-unsupported-model-type", "lora.py", model(config(lambda c: dict(c, model_type="bert"))),
         "config.json"),
    Case("model-config-unknown-rope-type", "lora.py",
         model(config(lambda c: dict(c, rope_parameters={"rope_type": "magic", "rope_theta": 1e4}))), "config.json"),
    # a family's option that changes the numbers and that models.py does not implement
    Case("model-config-unimplemented-family-option", "lora.py",
         model(config(lambda c: dict(c, model_type="gemma2", use_bidirectional_attention=True))), "config.json"),
    Case("model-config-gemma4-bidirectional", "lora.py",
         model(config(lambda c: dict(c, model_type="gemma4_text", use_bidirectional_attention="all"))), "config.json"),
    Case("model-config-gemma4-experts-unsized", "lora.py",
         model(config(lambda c: dict(c, model_type="gemma4_text", enable_moe_block=True, num_experts=4))),
         "config.json"),
    Case("model-config-olmo3-rope-not-nested", "lora.py",
         model(config(lambda c: dict(c, model_type="olmo3", rope_parameters={"rope_type": "default"}))),
         "config.json"),
    # the Hub's DeepSeek-V3 files (test_models checks the other settings DeepSeek refuses)
    Case("model-config-deepseek-v3-fp8", "lora.py", model(config(lambda c: dict(
        c, model_type="deepseek_v3", quantization_config={"quant_method": "fp8"}))), "quantization_config"),
    # LFM2's layers are short convolutions or attention over the whole row; transformers' masks know no other kind
    Case("model-config-lfm2-layer-type-unknown", "lora.py", model(config(lambda c: dict(
        c, model_type="lfm2", layer_types=["conv", "sliding_attention", "conv", "full_attention"]))),
         "config.json: layer_types"),
    Case("model-config-lfm2-moe-without-layer-types", "lora.py", model(config(lambda c: dict(c, model_type="lfm2_moe"))),
         "config.json: layer_types"),
    Case("model-config-lfm2-block-multiple-of-zero", "lora.py",
         model(config(lambda c: dict(c, model_type="lfm2", block_multiple_of=0))), "config.json: block_multiple_of"),
    Case("model-config-qwen3_5-sliding-layer", "lora.py",
         model(config(lambda c: dict(c, model_type="qwen3_5_text", layer_types=["sliding_attention"] * 4))),
         "config.json: layer_types"),
    Case("model-config-qwen3_5-activation-with-parameters", "lora.py",
         model(config(lambda c: dict(c, model_type="qwen3_5_text", hidden_act="xielu"))), "config.json: hidden_act"),
    Case("model-config-qwen3_next-value-heads-not-grouped", "lora.py",
         model(config(lambda c: dict(c, model_type="qwen3_next", linear_num_key_heads=2, linear_num_value_heads=3))),
         "config.json: linear_num_value_heads"),
    Case("model-config-granite4-alibi", "lora.py",
         model(config(lambda c: dict(c, model_type="granitemoehybrid", position_embedding_type="alibi"))),
         "config.json: position_embedding_type"),
    Case("model-config-granite4-conv-layers", "lora.py",
         model(config(lambda c: dict(c, model_type="granitemoehybrid", layer_types=["mamba", "conv"] * 2))),
         "config.json: layer_types"),
    Case("model-config-falcon-h1-ssm-multipliers-four", "lora.py",
         model(config(lambda c: dict(c, model_type="falcon_h1", ssm_multipliers=[1.0] * 4))),
         "config.json: ssm_multipliers"),
    Case("model-config-falcon-h1-xielu", "lora.py",  # in the Mamba-2 mixers' convolution too
         model(config(lambda c: dict(c, model_type="falcon_h1", hidden_act="xielu"))), "config.json: hidden_act"),
    Case("model-weights-truncated", "lora.py", model(lambda f, d: truncate(f / "model.safetensors")),
         "model.safetensors"),
    Case("model-weights-empty", "lora.py", model(lambda f, d: (f / "model.safetensors").write_bytes(b"")),
         "model.safetensors"),
    Case("model-weights-random-bytes", "lora.py", model(lambda f, d: random_bytes(f / "model.safetensors")),
         "model.safetensors"),
    Case("model-weight-missing", "lora.py",
         model(lambda f, d: rewrite_weights(f, lambda weights: weights.pop("model.layers.1.mlp.down_proj.weight"))),
         "damaged_model"),
    Case("model-weight-wrong-shape", "lora.py",
         model(lambda f, d: rewrite_weights(
             f, lambda weights: weights.update({"model.layers.1.mlp.down_proj.weight": mx.zeros((64, 127))}))),
         "damaged_model"),
    # a mixture of experts' checkpoint holds each expert's weights apart; the model stacks them
    Case("model-expert-missing", "lora.py",
         model(lambda f, d: rewrite_weights(
             f, lambda weights: weights.pop("model.layers.1.block_sparse_moe.experts.2.w1.weight")), source="moe"),
         "experts.2.w1.weight"),
    Case("model-convert-expert-of-another-shape", "convert.py", lambda w, d: [
        "--hf-path", damaged(w, d, lambda f, d: rewrite_weights(f, lambda weights: weights.update(
            {"model.layers.1.block_sparse_moe.experts.2.w1.weight": mx.zeros((127, 64))})), source="moe"),
        "--mlx-path", d / "out"], "experts.*.w1.weight"),
    Case("model-tokenizer-json-corrupt", "lora.py",
         model(lambda f, d: (f / "tokenizer.json").write_text('{"version": "1.0", "model": {')), "tokenizer.json"),
    Case("model-tokenizer-remote-code", "lora.py", model(evil_tokenizer), "damaged_model", never=("MARKER",)),
    Case("model-chat-template-escapes-the-sandbox", "lora.py",
         model(lambda f, d: edit_json(f / "tokenizer_config.json",
                                      lambda c: dict(c, chat_template="{{ ''.__class__.__mro__ }}" + CHAT_TEMPLATE)),
               source="chat_model", data="chat_data"), "damaged_model"),
    # sizes beyond the weights', checked before the model is built
    Case("model-config-num-hidden-layers-ten-million", "lora.py",
         model(config(lambda c: dict(c, num_hidden_layers=10**7))), "config.json: num_hidden_layers"),
    Case("model-config-num-hidden-layers-above-the-weights", "lora.py",
         model(config(lambda c: dict(c, num_hidden_layers=5))), "config.json: num_hidden_layers"),
    Case("model-config-hidden-size-10-to-the-30", "lora.py", model(config(lambda c: dict(c, hidden_size=10**30))),
         "config.json: hidden_size"),
    Case("model-config-vocab-size-above-the-embeddings", "lora.py",
         model(config(lambda c: dict(c, vocab_size=10**5))), "config.json: vocab_size"),
    Case("model-config-head-dim-huge", "lora.py", model(config(lambda c: dict(c, head_dim=2**31 - 1))),
         "config.json: head_dim"),
    Case("model-config-rms-norm-eps-1e400", "lora.py",
         model(config_text('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e400')), "config.json: rms_norm_eps"),
    Case("model-config-integer-of-5000-digits", "lora.py",
         model(config_text('"hidden_size": 64', '"hidden_size": ' + "9" * 5000)), "config.json"),
    Case("model-tokenizer-without-eos-token", "lora.py",
         model(lambda f, d: edit_json(f / "tokenizer_config.json", without("eos_token"))), "--add-eos-token"),
    Case("model-tokenizer-ids-past-the-vocab-size-prompt", "lora.py", prompt_on(vocabulary_of_100), "--prompt"),
    Case("model-tokenizer-ids-past-the-vocab-size-train", "lora.py", model(vocabulary_of_100), "train.jsonl"),
    Case("model-chat-template-runs-without-end", "lora.py",
         model(lambda f, d: edit_json(f / "tokenizer_config.json", lambda c: dict(c, chat_template=(
             "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + CHAT_TEMPLATE))),
               source="chat_model", data="chat_data"), "train.jsonl:1"),
    Case("model-prompt-beyond-memory", "lora.py", prompt_beyond_memory, "--prompt"),
    # a context of a billion tokens, all of them to generate: their keys and values would take a TB
    Case("model-max-tokens-beyond-memory", "lora.py",
         prompt_on(config(lambda c: dict(c, max_position_embeddings=10**9)), "--max-tokens", 10**9), "--prompt"),
    Case("model-does-not-exist", "lora.py", lambda w, d: train(w, d, model=d / "missing_model"), "missing_model"),
    Case("model-is-a-text-file", "lora.py", text_file_model, "model.txt"),
    Case("model-convert-weights-truncated", "convert.py", convert_truncated, "model.safetensors"),
    Case("model-fuse-config-invalid-json", "fuse.py", fuse_bad_config, "config.json"),
]


# --- D. GGUF files ------------------------------------------------------------------------------------------

def gguf_file(name, make, script_args):
    """d/name made by make(path, world); script_args(world, d, path): the flags, with it as the model."""
    def args(w, d):
        path = d / name
        make(path, w)
        return script_args(w, d, path)

    return args


def gguf_train(w, d, path):
    return train(w, d, model=path)


CASES += [
    Case("gguf-truncated", "lora.py", gguf_file("tiny.gguf", lambda p, w: truncate(copy(w.gguf, p)), gguf_train),
         "tiny.gguf"),
    Case("gguf-random-bytes", "lora.py", gguf_file("random.gguf", lambda p, w: random_bytes(p), gguf_train),
         "random.gguf"),
    Case("gguf-empty", "lora.py", gguf_file("empty.gguf", lambda p, w: p.write_bytes(b""), gguf_train), "empty.gguf"),
    Case("gguf-unknown-tensor", "lora.py",
         gguf_file("weird_tensor.gguf", lambda p, w: copy(w.gguf_weird, p), gguf_train), "weird_tensor.gguf"),
    Case("gguf-architecture-gpt2", "lora.py",
         gguf_file("gpt2_arch.gguf", lambda p, w: copy(w.gguf_gpt2, p), gguf_train), "gpt2_arch.gguf"),
    Case("gguf-convert-truncated", "convert.py",
         gguf_file("tiny.gguf", lambda p, w: truncate(copy(w.gguf, p)),
                   lambda w, d, p: ["--hf-path", p, "--mlx-path", d / "out"]), "tiny.gguf"),
    Case("gguf-fuse-truncated", "fuse.py",
         gguf_file("tiny.gguf", lambda p, w: truncate(copy(w.gguf, p)),
                   lambda w, d, p: ["--model", p, "--adapter-file", w.adapters, "--save-path", d / "fused"]),
         "tiny.gguf"),
]


# --- E. adapters --------------------------------------------------------------------------------------------

def lora_test(w, d, adapter):
    return on_test_set(w, d, adapter=adapter)


def lora_prompt(w, d, adapter):
    return prompt(w, d, adapter=adapter)


def fuse_into(w, d, adapter):
    return ["--model", w.model, "--adapter-file", adapter, "--save-path", d / "fused"]


def export_gguf_adapter(w, d, adapter, model=None):
    return ["--model", model or w.model, "--adapter-file", adapter, "--export-gguf-adapter", d / "adapter.gguf"]


def lora_resume_adapters(w, d, adapter):
    return train(w, d, "--resume-adapter-file", adapter)


def adapters(damage, run, source="mlx"):
    """The trained adapters copied to d/adapters (source "mlx": adapters.safetensors and adapter_config.json;
    "peft": fuse.py's PEFT export; "npz": adapters.npz), damaged by damage(folder); run(world, d, adapter), the
    adapter being the file (mlx, npz) or the folder (peft)."""
    def args(w, d):
        folder = d / "adapters"
        if source == "mlx":
            folder.mkdir()
            for name in ("adapters.safetensors", "adapter_config.json"):
                shutil.copy(w.trained() / name, folder)
        else:
            copy(w.peft if source == "peft" else w.npz, folder)
        damage(folder)
        name = {"mlx": "adapters.safetensors", "npz": "adapters.npz", "peft": ""}[source]
        return run(w, d, folder / name if name else folder)

    return args


def adapter_config(change):
    return lambda folder: edit_json(folder / "adapter_config.json", change)


def lora_parameters(**values):
    return adapter_config(lambda c: dict(c, lora_parameters={**c["lora_parameters"], **values}))


deeper_base = adapter_config(lambda c: dict(c, base_model_config={"num_hidden_layers": 8}))  # the model has 4
DEEPER = "adapters.safetensors: made for a model of num_hidden_layers 8, not 4"


def adapters_of_a_missing_expert(w, d):
    """The mixtral's adapters, for an expert it does not have (9 of 4)."""
    layer = "model.layers.3.block_sparse_moe.experts.9.w1"
    (d / "adapters").mkdir()
    mx.save_safetensors(str(d / "adapters" / "adapters.safetensors"),
                        {f"{layer}.lora_a": mx.zeros((64, 4)), f"{layer}.lora_b": mx.zeros((4, 128))})
    (d / "adapters" / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 4, "scale": 2.0}}))
    return on_test_set(w, d, model=w.moe, adapter=d / "adapters" / "adapters.safetensors")


def tied_model(w, d):
    """The tiny llama with its output layer tied to its embedding (tie_word_embeddings, its lm_head.weight gone)."""
    folder = copy(w.model, d / "tied")
    edit_json(folder / "config.json", lambda c: dict(c, tie_word_embeddings=True))
    rewrite_weights(folder, lambda weights: weights.pop("lm_head.weight"))
    return folder


def embedding_adapters(w, d, new_tokens=0):
    """LoRA adapters of the tiny llama's embedding in d/adapters, its tokenizer beside them with new_tokens more."""
    from transformers import AutoTokenizer

    folder = d / "adapters"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"),
                        {"model.embed_tokens.lora_a": mx.zeros((300, 4)),
                         "model.embed_tokens.lora_b": mx.ones((4, 64))})
    (folder / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 4, "scale": 2.0}}))
    tokenizer = AutoTokenizer.from_pretrained(w.model)
    tokenizer.add_tokens([f"<new{i}>" for i in range(new_tokens)])
    tokenizer.save_pretrained(folder)
    return folder / "adapters.safetensors"


CASES += [
    Case("lora-targets-lm-head-alone-on-a-tied-model", "lora.py",
         lambda w, d: train(w, d, "--lora-targets", "lm_head", model=tied_model(w, d)), "--lora-targets"),
    Case("fine-tune-type-dora-on-a-tied-embedding", "lora.py",
         lambda w, d: train(w, d, "--fine-tune-type", "dora", "--lora-targets", "embed_tokens", model=tied_model(w, d)),
         "--fine-tune-type"),
    Case("adapters-tokenizer-beside-with-new-tokens", "lora.py",
         lambda w, d: lora_test(w, d, embedding_adapters(w, d, new_tokens=400)), "its tokenizer has"),
    Case("adapters-tied-embedding-export-gguf-adapter", "fuse.py",
         lambda w, d: export_gguf_adapter(w, d, embedding_adapters(w, d), model=tied_model(w, d)),
         "--export-gguf-adapter"),
    Case("adapters-of-a-missing-expert", "lora.py", adapters_of_a_missing_expert, "experts.9.w1"),
    Case("adapters-truncated", "lora.py", adapters(lambda f: truncate(f / "adapters.safetensors"), lora_test),
         "adapters.safetensors"),
    Case("adapters-empty", "lora.py",
         adapters(lambda f: (f / "adapters.safetensors").write_bytes(b""), lora_prompt), "adapters.safetensors"),
    Case("adapters-random-bytes", "fuse.py", adapters(lambda f: random_bytes(f / "adapters.safetensors"), fuse_into),
         "adapters.safetensors"),
    Case("adapters-truncated-resume-adapter-file", "lora.py",
         adapters(lambda f: truncate(f / "adapters.safetensors"), lora_resume_adapters), "adapters.safetensors"),
    Case("adapters-missing", "fuse.py", lambda w, d: fuse_into(w, d, d / "missing.safetensors"),
         "missing.safetensors"),
    Case("adapter-config-invalid-json", "lora.py",
         adapters(lambda f: (f / "adapter_config.json").write_text('{"fine_tune_type": '), lora_test),
         "adapter_config.json"),
    Case("adapter-config-json-list", "fuse.py", adapters(adapter_config(lambda c: [c]), fuse_into),
         "adapter_config.json"),
    Case("adapter-config-lora-parameters-a-string", "fuse.py",
         adapters(adapter_config(lambda c: dict(c, lora_parameters="x")), fuse_into), "adapter_config.json"),
    Case("adapter-config-scale-a-string", "fuse.py", adapters(lora_parameters(rank=4, scale="big"), fuse_into),
         "adapter_config.json"),
    Case("adapter-config-rank-disagrees-with-weights", "lora.py", adapters(lora_parameters(rank=8), lora_test),
         "adapter_config.json"),
    Case("adapter-config-use-rslora-a-string", "fuse.py", adapters(lora_parameters(use_rslora="yes"), fuse_into),
         "adapter_config.json"),
    Case("adapter-config-fine-tune-type-weird", "fuse.py",
         adapters(adapter_config(lambda c: dict(c, fine_tune_type="weird")), fuse_into), "adapter_config.json"),
    Case("adapters-peft-r-disagrees-with-weights", "lora.py",
         adapters(adapter_config(lambda c: dict(c, r=8)), lora_test, source="peft"), "adapter_config.json"),
    Case("adapters-peft-r-disagrees-with-weights-fuse", "fuse.py",
         adapters(adapter_config(lambda c: dict(c, r=8)), fuse_into, source="peft"), "adapter_config.json"),
    Case("adapters-peft-use-dora-not-a-boolean", "lora.py",
         adapters(adapter_config(lambda c: dict(c, use_dora="yes")), lora_test, source="peft"), "use_dora"),
    Case("adapters-peft-pissa-unconverted", "fuse.py",
         adapters(adapter_config(lambda c: dict(c, init_lora_weights="pissa")), fuse_into, source="peft"),
         "init_lora_weights"),
    Case("init-lora-weights-olora-on-experts", "lora.py",
         lambda w, d: train(w, d, "--init-lora-weights", "olora", "--lora-targets", "experts.*.w1", model=w.moe),
         "--init-lora-weights"),
    Case("init-lora-weights-pissa-on-a-quantized-layer", "lora.py",
         lambda w, d: train(w, d, "--init-lora-weights", "pissa", "--lora-targets", "mlp.down_proj", "--lora-layers",
                            -1, model=numbers_model(quantized(DOWN))(w, d)), "down_proj is quantized"),
    Case("adapters-npz-truncated", "lora.py", adapters(lambda f: truncate(f / "adapters.npz"), lora_test, "npz"),
         "adapters.npz"),
    # made for a model of other layers, whose shapes this one's fit
    Case("adapters-of-a-deeper-model", "lora.py", adapters(deeper_base, lora_test), DEEPER),
    Case("adapters-of-a-deeper-model-fuse", "fuse.py", adapters(deeper_base, fuse_into), DEEPER),
    Case("adapters-of-a-deeper-model-resume-adapter-file", "lora.py", adapters(deeper_base, lora_resume_adapters),
         DEEPER),
    Case("adapter-config-base-model-config-a-list", "lora.py",
         adapters(adapter_config(lambda c: dict(c, base_model_config=[8])), lora_prompt), "adapters.safetensors"),
    Case("adapters-dora-export-gguf-adapter", "fuse.py",
         adapters(adapter_config(lambda c: dict(c, fine_tune_type="dora")), export_gguf_adapter),
         "--export-gguf-adapter"),
    Case("adapters-full-export-gguf-adapter", "fuse.py",
         adapters(adapter_config(lambda c: dict(c, fine_tune_type="full")), export_gguf_adapter),
         "--export-gguf-adapter"),
    Case("adapter-config-scale-zero-export-gguf-adapter", "fuse.py",
         adapters(lora_parameters(scale=0), export_gguf_adapter), "--export-gguf-adapter"),
    Case("model-export-gguf-adapter-family-llama-cpp-lacks", "fuse.py",  # the model's config says Ministral 8B
         lambda w, d: export_gguf_adapter(w, d, w.adapters, model=numbers_model(
             config_change=lambda c: dict(c, model_type="ministral"))(w, d)), "--export-gguf-adapter"),
]


# --- F. checkpoints and resume ------------------------------------------------------------------------------

def resume(damage, *more):
    """The training run copied to d/run (as `run`, relative to the cwd: the flags are the run's own), damaged
    by damage(checkpoint, run folder), then resumed from its checkpoint of iteration 2 with `more` flags."""
    def args(w, d):
        run = copy(w.trained(), d / "run")
        # where the checkpoints are, in either layout: run/checkpoints/step-N or run/runs/<n>/step-N
        checkpoint = next(p for p in run.glob("**/step-*") if p.name == "step-0000002")
        damage(checkpoint, run)
        return ["--model", w.model, "--data", w.data, *TRAIN_RUN, "--adapter-file", RUN_ADAPTERS,
                "--resume", checkpoint.relative_to(d), *more]

    return args


def as_saved(checkpoint, run):
    pass


def in_checkpoint(name, damage):
    return lambda checkpoint, run: damage(checkpoint / name)


def state(change):
    return in_checkpoint("trainer_state.json", lambda p: edit_json(p, change))


def damage_metrics(checkpoint, run):
    path = next(run.glob("**/metrics.jsonl"))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + ["{not json"] + lines[1:]) + "\n")


def resume_a_file(w, d):
    (d / "ckpt.txt").write_text("not a checkpoint")
    return train(w, d, "--resume", d / "ckpt.txt")


CASES += [
    Case("resume-trainer-state-missing", "lora.py", resume(in_checkpoint("trainer_state.json", Path.unlink)),
         "trainer_state.json"),
    Case("resume-trainer-state-invalid-json", "lora.py",
         resume(in_checkpoint("trainer_state.json", lambda p: p.write_text('{"iteration": 2,'))), "trainer_state.json"),
    Case("resume-trainer-state-json-list", "lora.py", resume(state(lambda s: [s])), "trainer_state.json"),
    Case("resume-trainer-state-iteration-a-string", "lora.py", resume(state(lambda s: dict(s, iteration="ten"))),
         "trainer_state.json"),
    Case("resume-trainer-state-without-args", "lora.py", resume(state(without("args"))), "trainer_state.json"),
    Case("resume-trainer-state-best-metric-a-string", "lora.py", resume(state(lambda s: dict(s, best_metric="low"))),
         "trainer_state.json"),
    Case("resume-optimizer-truncated", "lora.py", resume(in_checkpoint("optimizer.safetensors", truncate)),
         "optimizer.safetensors"),
    Case("resume-optimizer-missing", "lora.py", resume(in_checkpoint("optimizer.safetensors", Path.unlink)),
         "optimizer.safetensors"),
    Case("resume-with-another-optimizer", "lora.py", resume(as_saved, "--optimizer", "lion", "--accept-flag-changes"),
         "optimizer.safetensors"),  # Adam's state: not Lion's
    Case("resume-adapters-truncated", "lora.py", resume(in_checkpoint("adapters.safetensors", truncate)),
         "adapters.safetensors"),
    Case("resume-other-learning-rate", "lora.py", resume(as_saved, "--learning-rate", 1e-3),
         "--learning-rate"),
    Case("resume-other-lora-rank", "lora.py", resume(as_saved, "--lora-rank", 8), "--lora-rank"),
    # nothing left to train: an error, not a new run folder and exit 0
    Case("resume-iters-below-the-checkpoint", "lora.py", resume(as_saved, "--iters", 1), "--iters"),
    Case("resume-metrics-damaged", "lora.py", resume(damage_metrics), "metrics.jsonl"),
    Case("resume-a-file", "lora.py", resume_a_file, "--resume"),
    Case("resume-checkpoint-of-a-deeper-model", "lora.py",
         resume(lambda checkpoint, run: deeper_base(checkpoint)),
         "step-0000002: made for a model of num_hidden_layers 8"),
]


# --- G. YAML --config ---------------------------------------------------------------------------------------

def yaml_file(content, *flags):
    """--config d/flags.yaml holding content (str or bytes), over a short training run's flags (`flags`, or
    train's: a flag on the command line wins over the file)."""
    def args(w, d):
        path = d / "flags.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        base = list(flags) if flags else train(w, d)
        return [*base, "--config", path]

    return args


def bare(w, d):
    return ["--model", w.model, "--data", w.data, "--adapter-file", d / "out" / "adapters.safetensors"]


def yaml_without_batch_size(content):
    def args(w, d):
        return yaml_file(content, *bare(w, d))(w, d)

    return args


CASES += [
    Case("yaml-invalid", "lora.py", yaml_file("lora_layers: [1, 2\nbatch_size: 4\n"), "flags.yaml"),
    Case("yaml-a-list", "lora.py", yaml_file("- lora_layers\n- 2\n"), "flags.yaml"),
    Case("yaml-not-utf8", "lora.py", yaml_file(b"lora_layers: 2\nseed: \xff\xfe\n"), "flags.yaml"),
    Case("yaml-unknown-key", "lora.py", yaml_file("lora_layers: 2\nbatch_sise: 4\n"), "flags.yaml"),
    Case("yaml-missing-file", "lora.py",
         lambda w, d: [*train(w, d), "--config", d / "no_flags.yaml"], "no_flags.yaml"),
    Case("yaml-batch-size-zero", "lora.py",
         yaml_without_batch_size("train: true\niters: 2\nlora_layers: 2\nbatch_size: 0\n"), "--batch-size"),
    Case("yaml-batch-size-not-a-number", "lora.py",
         yaml_without_batch_size("train: true\niters: 2\nlora_layers: 2\nbatch_size: four\n"), "--batch-size"),
    Case("yaml-switch-the-string-false", "lora.py", yaml_file('mask_prompt: "false"\n'), "flags.yaml: mask_prompt"),
    Case("yaml-a-list-for-one-value", "lora.py", yaml_file("lora_layers: [1, 2]\n"), "flags.yaml: lora_layers"),
    # mlx-lm's keys
    Case("yaml-mlx-lm-schedule-ending-above-zero", "lora.py",
         yaml_file("iters: 2\nlr_schedule:\n  name: cosine_decay\n  arguments: [1e-5, 2, 1e-7]\n"),
         "flags.yaml: lr_schedule: arguments"),
    Case("yaml-mlx-lm-lora-parameter-unknown", "lora.py", yaml_file("lora_parameters:\n  rank: 4\n  alpha: 16\n"),
         "flags.yaml: lora_parameters: alpha"),
    Case("yaml-mlx-lm-two-datasets", "lora.py", yaml_file("hf_dataset:\n  - path: a\n  - path: b\n"),
         "flags.yaml: hf_dataset"),
    Case("yaml-mlx-lm-lora-rank-zero", "lora.py", yaml_file("lora_parameters:\n  rank: 0\n"),
         "flags.yaml: lora_parameters: rank: --lora-rank"),
]


# --- H. outputs ---------------------------------------------------------------------------------------------

def under_a_file(w, d):
    (d / "somefile.txt").write_text("a file, not a folder")
    return train(w, d, "--adapter-file", d / "somefile.txt" / "adapters.safetensors")


def read_only_folder(w, d):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (d / "ro").mkdir(mode=0o555)
    return train(w, d, "--adapter-file", d / "ro" / "adapters.safetensors")


def onto_model_weights(w, d):
    """Training would write its adapters over the model's own weights."""
    base = copy(w.model, d / "base")
    return train(w, d, "--adapter-file", base / "model.safetensors", model=base)


def convert_onto_a_file(w, d):
    (d / "existing.txt").write_text("mine")
    return ["--hf-path", w.model, "--mlx-path", d / "existing.txt"]


def convert_into_itself(w, d):
    source = copy(w.model, d / "src")
    return ["--hf-path", source, "--mlx-path", source, "--force"]


def convert_into_its_parent(w, d):
    source = copy(w.model, d / "parent" / "src")
    return ["--hf-path", source, "--mlx-path", d / "parent", "--force"]


def fuse_into_the_model(w, d):
    base = copy(w.model, d / "base")
    return ["--model", base, "--adapter-file", w.adapters, "--save-path", base, "--force"]


def fuse_into_the_adapters_folder(w, d):
    folder = d / "ad"
    folder.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        shutil.copy(w.trained() / name, folder)
    return ["--model", w.model, "--adapter-file", folder / "adapters.safetensors", "--save-path", folder, "--force"]


def gguf_onto_itself(w, d):
    source = copy(w.gguf, d / "tiny.gguf")
    return ["--model", source, "--adapter-file", w.adapters, "--export-gguf", source, "--force"]


def peft_onto_itself(w, d):
    source = copy(w.peft, d / "peft")
    return ["--model", w.model, "--adapter-file", source, "--export-peft", source, "--force"]


LONG_NAME = "a" * 240  # a legal name (under 255 bytes), whose temporary names are not


def in_the_way(name, make):
    """A short training run into d/out, where make(path) puts something at out/NAME first; on a model that is
    not there: the outputs are checked before the model is loaded."""
    def args(w, d):
        (d / "out").mkdir()
        make(d / "out" / name)
        return train(w, d, model=nowhere(d))

    return args


def foreign_folder(d):
    """A folder of the user's own work, which no --force may delete."""
    folder = d / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "config.json").write_text("{}")  # a model folder's file among others is not a model folder
    return folder


def folder_at(path):
    path.mkdir()
    return path


def gguf_onto_a_text_file(w, d):
    (d / "notes.gguf").write_text("mine")
    return ["--model", w.model, "--adapter-file", w.adapters, "--export-gguf", d / "notes.gguf", "--force"]


CASES += [
    Case("out-adapter-file-name-too-long", "lora.py",
         lambda w, d: train(w, d, "--adapter-file", d / "out" / f"{LONG_NAME}.safetensors", model=nowhere(d)),
         "--adapter-file"),
    Case("out-adapter-file-is-a-folder", "lora.py", in_the_way("adapters.safetensors", Path.mkdir),
         "adapters.safetensors"),
    Case("out-adapter-file-is-a-fifo", "lora.py", in_the_way("adapters.safetensors", os.mkfifo),
         "adapters.safetensors"),
    Case("out-adapter-config-is-a-folder", "lora.py", in_the_way("adapter_config.json", Path.mkdir),
         "adapter_config.json"),
    Case("out-runs-is-a-file", "lora.py", in_the_way("runs", lambda p: p.write_text("mine")), "out/runs"),
    Case("out-convert-mlx-path-name-too-long", "convert.py",
         lambda w, d: ["--hf-path", w.model, "--mlx-path", d / LONG_NAME], "--mlx-path"),
    Case("out-fuse-export-peft-name-too-long", "fuse.py",
         lambda w, d: ["--model", w.model, "--adapter-file", w.adapters, "--export-peft", d / LONG_NAME],
         "--export-peft"),
    Case("out-fuse-export-gguf-name-too-long", "fuse.py",
         lambda w, d: ["--model", w.model, "--adapter-file", w.adapters, "--export-gguf", d / f"{LONG_NAME}.gguf"],
         "--export-gguf"),
    Case("out-convert-force-onto-a-foreign-folder", "convert.py",
         lambda w, d: ["--hf-path", w.model, "--mlx-path", foreign_folder(d), "--force"], "--mlx-path"),
    Case("out-fuse-force-onto-a-foreign-folder", "fuse.py",
         lambda w, d: ["--model", w.model, "--adapter-file", w.adapters, "--save-path", foreign_folder(d), "--force"],
         "--save-path"),
    Case("out-fuse-export-gguf-force-onto-a-text-file", "fuse.py", gguf_onto_a_text_file, "--export-gguf"),
    Case("out-fuse-export-gguf-onto-a-folder", "fuse.py",
         lambda w, d: ["--model", w.model, "--adapter-file", w.adapters, "--export-gguf", folder_at(d / "x.gguf")],
         "x.gguf: is a folder"),
    Case("out-adapter-file-under-a-file", "lora.py", under_a_file, "--adapter-file"),
    Case("out-adapter-file-in-a-read-only-folder", "lora.py", read_only_folder, "--adapter-file"),
    Case("out-adapter-file-wrong-extension", "lora.py",
         lambda w, d: train(w, d, "--adapter-file", d / "adapters.txt"), "--adapter-file"),
    Case("out-adapter-file-onto-the-model-weights", "lora.py", onto_model_weights, "--adapter-file"),
    Case("out-convert-mlx-path-a-file", "convert.py", convert_onto_a_file, "--mlx-path"),
    Case("out-convert-mlx-path-is-the-source-force", "convert.py", convert_into_itself, "--mlx-path"),
    Case("out-convert-mlx-path-holds-the-source-force", "convert.py", convert_into_its_parent, "--mlx-path"),
    Case("out-fuse-save-path-is-the-model-force", "fuse.py", fuse_into_the_model, "--save-path"),
    Case("out-fuse-save-path-holds-the-adapters-force", "fuse.py", fuse_into_the_adapters_folder, "--save-path"),
    Case("out-fuse-export-gguf-onto-the-source-force", "fuse.py", gguf_onto_itself, "--export-gguf"),
    Case("out-fuse-export-peft-onto-the-adapters-force", "fuse.py", peft_onto_itself, "--export-peft"),
    Case("out-fuse-export-gguf-adapter-onto-the-adapters-force", "fuse.py",
         adapters(lambda f: None, lambda w, d, a: export_gguf_adapter(w, d, a)[:-1] + [a, "--force"]),
         "--export-gguf-adapter"),
    Case("out-fuse-export-gguf-adapter-onto-a-folder", "fuse.py",
         lambda w, d: export_gguf_adapter(w, d, w.adapters)[:-1] + [folder_at(d / "x.gguf")], "x.gguf: is a folder"),
    Case("out-fuse-export-gguf-adapter-inside-save-path", "fuse.py",
         lambda w, d: export_gguf_adapter(w, d, w.adapters)[:-1] + [d / "fused" / "x.gguf", "--save-path", d / "fused"],
         "--export-gguf-adapter"),
    Case("out-fuse-export-gguf-adapter-is-export-gguf", "fuse.py",
         lambda w, d: export_gguf_adapter(w, d, w.adapters) + ["--export-gguf", d / "adapter.gguf"],
         "adapter.gguf: is --export-gguf"),
]


# --- I. numbers: weights that are not finite, outputs that are not, values beyond the type written ---------

DOWN = "model.layers.1.mlp.down_proj"  # (64, 128): quantizes in groups of 64


def set_weight(name, value):
    """A change for rewrite_weights: the first value of weight `name` set to `value`."""
    def change(weights):
        array = np.array(weights[name])
        array.flat[0] = value
        weights[name] = mx.array(array)

    return change


def quantized(name, scales_nan=False):
    """A change for rewrite_weights: layer `name` stored 4-bit (weight, scales and biases in float32, as
    convert.py -q --dtype float32 writes them), after `change`; its first scale NaN if scales_nan."""
    def change(weights):
        weight, scales, biases = mx.quantize(weights.pop(f"{name}.weight"), group_size=64, bits=4)
        weights.update({f"{name}.weight": weight, f"{name}.scales": scales, f"{name}.biases": biases})
        if scales_nan:
            set_weight(f"{name}.scales", np.nan)(weights)

    return change


def both(*changes):
    return lambda weights: [change(weights) for change in changes]


def numbers_model(change=None, config_change=None):
    """A copy of the model in d/numbers_model, its weights changed by change(weights) (rewrite_weights), its
    config by config_change."""
    def make(w, d):
        folder = copy(w.model, d / "numbers_model")
        if change:
            rewrite_weights(folder, change)
        if config_change:
            edit_json(folder / "config.json", config_change)
        return folder

    return make


def scaled_adapters(factor):
    """The trained adapters, every lora_b set to `factor`: finite weights whose outputs are not."""
    def damage(folder):
        path = folder / "adapters.safetensors"
        weights = dict(mx.load(str(path)))
        mx.save_safetensors(str(path), {k: mx.full(v.shape, factor) if k.endswith("lora_b") else v
                                        for k, v in weights.items()})

    return damage


def nan_adapters(folder):
    path = folder / "adapters.safetensors"
    weights = dict(mx.load(str(path)))
    set_weight("model.layers.3.self_attn.v_proj.lora_a", np.nan)(weights)
    mx.save_safetensors(str(path), weights)


def nan_gguf(path, w):
    """The tiny model as a Q4_0 GGUF file, one weight NaN (its block's scale too)."""
    import copy as copying

    from gguf import GGMLQuantizationType as T

    reference = copying.deepcopy(w.reference)
    with torch.no_grad():
        reference.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    write_gguf(path, w.model, reference, T.Q4_0)


BIG = numbers_model(set_weight(f"{DOWN}.weight", 1e5))  # beyond float16's range (65504)
# finite weights, but the final norm's output overflows the logits: the model's losses are not finite
OVERFLOWING = numbers_model(lambda weights: weights.update({"model.norm.weight": weights["model.norm.weight"] * 1e38}))


def dpo_on(model_folder):
    def args(w, d):
        folder = d / "pairs"
        folder.mkdir()
        (folder / "train.jsonl").write_text(PAIRS)
        return train(w, d, *DPO, data=folder, model=model_folder(w, d))

    return args


CASES += [
    Case("numbers-model-weight-nan", "lora.py",
         lambda w, d: train(w, d, model=numbers_model(set_weight(f"{DOWN}.weight", np.nan))(w, d)),
         f"model.safetensors: tensor {DOWN}.weight holds NaN"),
    Case("numbers-model-weight-inf-test", "lora.py",
         lambda w, d: on_test_set(w, d, model=numbers_model(set_weight("model.embed_tokens.weight", -np.inf))(w, d)),
         "tensor model.embed_tokens.weight holds Inf"),
    Case("numbers-model-quantized-scale-nan", "lora.py",
         lambda w, d: prompt(w, d, model=numbers_model(quantized(DOWN, scales_nan=True))(w, d)),
         f"tensor {DOWN}.scales holds NaN"),
    Case("numbers-gguf-weight-nan", "lora.py", gguf_file("nan.gguf", nan_gguf, gguf_train), "nan.gguf: tensor blk.1"),
    Case("numbers-model-overflows-dpo-reference", "lora.py", dpo_on(OVERFLOWING), "DPO's reference"),
    Case("numbers-model-overflows-test", "lora.py", lambda w, d: on_test_set(w, d, model=OVERFLOWING(w, d)),
         "--test: the loss of the model without adapters"),
    Case("numbers-adapters-nan", "lora.py", adapters(nan_adapters, lora_test),
         "adapters.safetensors: tensor model.layers.3.self_attn.v_proj.lora_a holds NaN"),
    Case("numbers-adapters-nan-fuse", "fuse.py", adapters(nan_adapters, fuse_into), "holds NaN"),
    Case("numbers-resume-adapters-nan", "lora.py", resume(in_checkpoint("", nan_adapters)), "holds NaN"),
    Case("numbers-adapters-give-nan-test", "lora.py", adapters(scaled_adapters(1e38), lora_test),
         "--test: the loss of the model with the adapters"),
    Case("numbers-adapters-give-nan-prompt", "lora.py", adapters(scaled_adapters(1e38), lora_prompt),
         "--prompt: the model's output"),
    Case("numbers-adapters-beyond-float16-gguf", "fuse.py",
         adapters(scaled_adapters(1e5), lambda w, d, a: ["--model", w.model, "--adapter-file", a,
                                                         "--export-gguf", d / "fused.gguf"]),
         "beyond float16's range"),
    Case("numbers-fused-beyond-float16", "fuse.py",
         adapters(scaled_adapters(1e5), lambda w, d, a: [
             "--model", numbers_model(config_change=lambda c: dict(c, dtype="float16"))(w, d), "--adapter-file", a,
             "--save-path", d / "fused"]),
         "the model fused with"),
    Case("numbers-convert-beyond-float16", "convert.py",
         lambda w, d: ["--hf-path", BIG(w, d), "--mlx-path", d / "out", "--dtype", "float16"],
         f"tensor {DOWN}.weight holds values up to 1e+05 in magnitude, beyond float16's range"),
    Case("numbers-convert-quantize-beyond-float16", "convert.py",
         lambda w, d: ["--hf-path", BIG(w, d), "--mlx-path", d / "out", "-q", "--dtype", "float16"],
         f"tensor {DOWN}.biases"),
    Case("numbers-convert-de-quantize-beyond-float16", "convert.py",
         lambda w, d: ["--hf-path", numbers_model(both(set_weight(f"{DOWN}.weight", 1e5), quantized(DOWN)))(w, d),
                       "--mlx-path", d / "out", "--dtype", "float16"], "beyond float16's range"),
    Case("numbers-fuse-de-quantize-beyond-float16", "fuse.py",
         lambda w, d: ["--model", numbers_model(both(set_weight(f"{DOWN}.weight", 1e5), quantized(DOWN)))(w, d),
                       "--adapter-file", w.adapters, "--save-path", d / "fused", "--de-quantize"],
         "de-quantized to float16"),
]


def prompt_file(content, name="prompts.txt", *more, model_needed=False):
    """--prompt-file d/name holding `content` (None: no such file); the model missing where the error must come
    before it is read."""
    def args(w, d):
        if content is not None:
            (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["--model", w.model if model_needed else nowhere(d), "--prompt-file", d / name, "--max-tokens", 4,
                *more]

    return args


CASES += [
    Case("prompt-file-missing", "lora.py", prompt_file(None), "--prompt-file"),
    Case("prompt-file-empty", "lora.py", prompt_file(""), "prompts.txt: no prompts"),
    Case("prompt-file-empty-line-3", "lora.py", prompt_file("Q: a\nQ: b\n  \nQ: c\n"), "prompts.txt:3"),
    Case("prompt-file-not-utf8", "lora.py", prompt_file(b"Q: caf\xff\n"), "prompts.txt"),
    Case("prompt-file-jsonl-no-prompt-line-2", "lora.py",
         prompt_file('{"prompt": "Q: a"}\n{"text": "Q: b"}\n', "prompts.jsonl"), "prompts.jsonl:2"),
    Case("prompt-file-jsonl-invalid-line-1", "lora.py", prompt_file('{"prompt": \n', "prompts.jsonl"),
         "prompts.jsonl:1"),
    Case("prompt-file-longer-than-the-context-line-2", "lora.py",
         prompt_file("Q: a\n" + "Q " * 200 + "\n", model_needed=True), "prompts.txt:2"),  # the context is 256
    Case("prompt-file-chat-without-template-line-1", "lora.py",
         prompt_file(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n", "chats.jsonl",
                     model_needed=True), "chats.jsonl:1"),
    Case("prompt-file-output-is-a-folder", "lora.py", prompt_file("Q: a\n", "prompts.txt", "--output", "."),
         "--output"),
    Case("prompt-file-output-is-the-prompt-file", "lora.py",
         lambda w, d: prompt_file("Q: a\n")(w, d) + ["--output", d / "prompts.txt"], "--output"),
    Case("output-without-prompt-file", "lora.py", lambda w, d: prompt(w, d, "--output", d / "a.jsonl",
                                                                        model=nowhere(d)), "--output"),
]


# --- J. environment ---------------------------------------------------------------------------------------

CASES += [
    Case("env-tmpdir-missing", "lora.py", lambda w, d: train(w, d), "TMPDIR",
         env=lambda w, d: {"TMPDIR": str(d / "no_tmp")}),
    Case("env-mlx-hostfile-not-json", "lora.py", lambda w, d: prompt(w, d, model=nowhere(d)), "MLX_HOSTFILE",
         env=hostfile("{not json")),
    Case("env-mlx-hostfile-no-hosts", "lora.py", lambda w, d: prompt(w, d, model=nowhere(d)), "MLX_HOSTFILE",
         env=hostfile("[]")),
    Case("env-mlx-rank-not-a-number", "lora.py", lambda w, d: prompt(w, d, model=nowhere(d)), "MLX_RANK",
         env=hostfile(TWO_HOSTS, rank="one")),
    Case("env-mlx-rank-past-the-hosts", "lora.py", lambda w, d: prompt(w, d, model=nowhere(d)), "MLX_RANK",
         env=hostfile(TWO_HOSTS, rank="2")),
]


# --- the runner ---------------------------------------------------------------------------------------------

def snapshot(*roots):
    """{path: sha256} of every file under the roots, lock files (".*.lock") aside: they may come and go."""
    files = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and not path.name.endswith(".lock"):
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def error_lines(stderr):
    """stderr's lines, less tqdm's progress bars (each line as its last carriage return left it) and blanks."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in stderr.split("\n")]
    return [line for line in lines if line and not ("|" in line and "it/s" in line or "%|" in line)]


def compare(before, after):
    changed = sorted(p for p in before.keys() & after.keys() if before[p] != after[p])
    added, removed = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())
    return [f"{what}: {', '.join(paths)}" for what, paths in
            (("changed", changed), ("added", added), ("removed", removed)) if paths]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, world, tmp_path):
    d = tmp_path / "case"
    d.mkdir()
    flags = case.args(world, d)
    env = case.env(world, d)
    before = snapshot(d, world.root)
    start = time.perf_counter()
    try:
        result = script(case.script, *flags, cwd=d, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case.script} hung (no exit in {TIMEOUT} s)")
    took = time.perf_counter() - start
    lines = error_lines(result.stderr)
    problems = []
    if result.returncode == 0:
        problems.append("1: exit code 0")
    if len(lines) != 1 or not lines[0].startswith(f"{case.script}: error: "):
        problems.append(f"2: stderr is not one line '{case.script}: error: ...' ({len(lines)} lines)")
    if "Traceback" in result.stdout + result.stderr:
        problems.append("3: a traceback")
    if not lines or case.expect not in lines[-1]:
        problems.append(f"4: the error line does not name {case.expect!r}")
    after = {path: digest for path, digest in snapshot(d, world.root).items()
             if not (case.in_training and Path(path).is_relative_to(d / "out" / "runs"))}
    problems += [f"5: files {change}" for change in compare(before, after)]
    problems += [f"marker: {name} appeared" for name in case.never if (d / name).exists()]
    assert not problems, (f"{case.script} exit {result.returncode} after {took:.1f} s\n" + "\n".join(problems)
                          + "\n--- stderr (last lines) ---\n" + "\n".join(result.stderr.splitlines()[-8:]))
