"""LoRA / QLoRA fine-tuning (--train), test perplexity (--test) and generation (--prompt)."""
import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import numbers
import os
import re
import shutil
import signal
import sys
import time
import types
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten
from tqdm import tqdm

import models
import utils
from utils import UserError

DEFAULT_ADAPTER_FILE = "adapters.safetensors"
# logits (tokens x vocabulary) computed at once, in float32 128 MiB: a chunk of a 128k vocabulary is 261 tokens, of a
# 32k one 1,024, so that a chunk's several float32 arrays of logits (its log-softmax, its gradient) take about the
# same memory whatever the vocabulary
LOSS_LOGITS = 2**25
FORWARD_BATCH_TOKENS = 8192  # positions the passes without a gradient compute at once (length_groups)
GENERATION_BATCH = 32  # prompts generated together (--generate-eval, --prompt-file)
TEMPLATE_LIMITS = (10.0, 2**28)  # the seconds and bytes of memory a chat template may take for one example


# Arguments


def build_parser():
    p = utils.ArgumentParser(description="LoRA or QLoRA fine-tuning: --train, --test and/or --prompt.")
    model = p.add_argument_group("model")
    model.add_argument("--model", type=utils.expanded_path, default="mlx_model",
                       help="Model folder (Hugging Face layout), Hugging Face repo id, or .gguf file, of a "
                            f"supported model_type: {', '.join(models.FAMILIES)}.")
    model.add_argument("--list-targets", type=utils.expanded_path, metavar="MODEL",
                       help="Print the linear layers of MODEL's decoder layers that --lora-targets may name, and exit.")
    model.add_argument("--config", type=utils.expanded_path,
                       help="YAML file of flags (lora_layers: 8, lora_targets: [q_proj, v_proj], train: true, ...), or "
                            "mlx-lm's lora_config.yaml; flags given on the command line win.")
    model.add_argument("--seed", type=utils.SEED, default=0, help="Seed of the random number generators.")

    data = p.add_argument_group("data")
    data.add_argument("--data", type=utils.expanded_path, default="data/",
                      help="Folder with train.jsonl, valid.jsonl, test.jsonl; or a Hugging Face dataset: a hub id, "
                           "or a .parquet, .arrow, .csv, .json or .jsonl file, or a folder of them.")
    for split, default in DATASET_SPLITS.items():
        data.add_argument(f"--{split}-split", metavar="SPLIT",
                          help=f"The split of a Hugging Face dataset that is the {split} set (default "
                               f"{' or '.join(default)}); a slice such as train[:90%%] too.")
    for flag, key in FEATURE_FLAGS.items():
        data.add_argument("--" + flag.replace("_", "-"), metavar="COLUMN",
                          help=f"The column (key) of the data that holds the examples' {key!r} (as mlx-lm's "
                               f"{flag}).")
    data.add_argument("--max-seq-length", type=utils.flag_type(int, lambda v: v >= 2, "an integer of at least 2"),
                      default=2048, help="Longer examples are truncated.")
    data.add_argument("--add-eos-token", type=int, choices=(0, 1), default=1,
                      help="Append EOS to each example (0: don't).")
    data.add_argument("--mask-prompt", action="store_true",
                      help="Train on the completion only: a {prompt, completion} example's completion, or a chat's "
                           "assistant messages.")
    data.add_argument("--pack", action="store_true",
                      help="Concatenate each batch's examples into one row, attention kept within each example: "
                           "no padding.")
    data.add_argument("--sort-by-length", action="store_true",
                      help="Batch examples of similar lengths together (batches still come in random order): less "
                           "padding.")

    lora = p.add_argument_group("LoRA")
    lora.add_argument("--train", action="store_true", help="Train the adapters.")
    lora.add_argument("--fine-tune-type", choices=(*models.ADAPTER_KINDS, "full"), default="lora",
                      help="LoRA adapters, DoRA adapters (LoRA plus a trained magnitude per output feature), or full "
                           "fine-tuning of every weight of the last --lora-layers layers.")
    lora.add_argument("--lora-layers", type=utils.POSITIVE_INT_OR_ALL, default=16,
                      help="Adapt (or, with full, train) the last N layers (-1: all).")
    lora.add_argument("--lora-targets", nargs="+",
                      help="Linear layers inside a decoder layer to adapt: paths, their last parts or patterns, "
                           "e.g. self_attn.q_proj mlp.down_proj 'experts.*.w1' (default: q_proj and v_proj; "
                           "Phi-3: self_attn.qkv_proj; Falcon: self_attention.query_key_value); also embed_tokens "
                           "and lm_head, the embedding and output layer (PEFT's names; a tied output layer shares "
                           "the embedding's adapter, as PEFT's ensure_weight_tying), whose adapters save the "
                           "tokenizer beside them. See --list-targets.")
    lora.add_argument("--lora-rank", type=utils.POSITIVE_INT, default=8, help="Rank of the adapters.")
    scale = lora.add_mutually_exclusive_group()
    scale.add_argument("--lora-scale", type=utils.POSITIVE, default=20.0, help="Scale of the adapter's output.")
    scale.add_argument("--lora-alpha", type=utils.POSITIVE, help="Alternatively alpha, as in PEFT: scale = alpha / rank.")
    lora.add_argument("--use-rslora", action="store_true",
                      help="rsLoRA (PEFT's use_rslora): scale = --lora-alpha / sqrt(rank), which stays fit for "
                           "large ranks.")
    lora.add_argument("--lora-dropout", type=utils.DROPOUT, default=0.0, help="Dropout on the adapters' input.")
    lora.add_argument("--init-lora-weights", type=init_lora_weights, default="default",
                      help="How new LoRA adapters start, as PEFT's init_lora_weights: default (B zero), gaussian, "
                           "pissa, pissa_niter_N (PiSSA: the weights' principal components, the exact SVD) or olora "
                           "(QR); PiSSA and OLoRA train on a residual base (a float one) and save adapters of the "
                           "original, of twice the rank.")
    lora.add_argument("--train-mode", choices=tuple(OBJECTIVES), default="sft",
                      help="What the adapters learn: the examples' text (sft); to prefer each pair's chosen "
                           "response to its rejected one (dpo, orpo, simpo, cpo: data of {\"prompt\", \"chosen\", "
                           "\"rejected\"} pairs); from completions labelled desirable or not (kto: data of "
                           "{\"prompt\", \"completion\", \"label\"}); or from the rewards of its own "
                           "completions (grpo: data of {\"prompt\", other columns}). data/README.md says more.")
    for name, spec in OBJECTIVE_FLAGS.items():  # each read by the objectives that have it as a field
        lora.add_argument("--" + name.replace("_", "-"), **spec)
    lora.add_argument("--adapter-file", type=utils.expanded_path,
                      help=f"Adapter weights to save (.safetensors or .npz) or load (also an mlx-lm or PEFT adapter "
                           f"folder; default {DEFAULT_ADAPTER_FILE}: training's last adapters, its best beside them "
                           f"as adapters.best.safetensors: see --early-stopping-patience). Adapters of embed_tokens "
                           f"or lm_head use the tokenizer saved beside them, if any, rather than --model's.")
    lora.add_argument("--resume-adapter-file", type=utils.expanded_path,
                      help="Continue training these adapters (file, mlx-lm or PEFT folder).")

    optimisation = p.add_argument_group("optimisation")
    optimisation.add_argument("--batch-size", type=utils.POSITIVE_INT, default=4,
                              help="Minibatch size: examples, pairs, or (grpo, as TRL's) completions, "
                                   "--num-generations of each prompt.")
    length = optimisation.add_mutually_exclusive_group()
    length.add_argument("--iters", type=utils.POSITIVE_INT, default=1000, help="Iterations to train for.")
    length.add_argument("--epochs", type=utils.POSITIVE_INT,
                        help="Train for N passes over train.jsonl instead: --iters becomes N times its batches "
                             "(examples // --batch-size, the last partial batch left out, as mlx-lm and the data "
                             "order here count them) over --grad-accumulation-steps, rounded up.")
    optimisation.add_argument("--learning-rate", type=utils.POSITIVE, default=1e-5, help="Peak learning rate.")
    optimisation.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adam",
                              help="MLX's Adam, AdamW, Adafactor (here with --learning-rate and its schedule as the "
                                   "step size, not its own relative step), SGD (no momentum), Muon or Lion, at "
                                   "MLX's defaults otherwise.")
    optimisation.add_argument("--weight-decay", type=utils.NON_NEGATIVE, default=0.0,
                              help="Weight decay of every optimizer but Adam: decoupled (AdamW, Adafactor, Lion), or "
                                   "an L2 penalty in the gradient (SGD, Muon).")
    optimisation.add_argument("--lora-plus-ratio", type=utils.POSITIVE,
                              help="LoRA+ (PEFT's create_loraplus_optimizer): the adapters' B matrices (and DoRA's "
                                   "magnitudes) learn at this many times the learning rate (the paper uses 16).")
    optimisation.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"), default="constant",
                              help="After the warmup: constant, or decaying to 0 at --iters, linearly or along a "
                                   "cosine.")
    optimisation.add_argument("--warmup", type=utils.NON_NEGATIVE_INT, default=0,
                              help="Iterations of linear warmup from 0.")
    optimisation.add_argument("--grad-accumulation-steps", type=utils.POSITIVE_INT, default=1,
                              help="Batches per update: the effective batch is this times --batch-size, in the "
                                   "memory of one batch.")
    optimisation.add_argument("--max-grad-norm", type=utils.POSITIVE, help="Clip the gradient to this global L2 norm.")
    optimisation.add_argument("--grad-checkpoint", action="store_true",
                              help="Recompute each layer's activations in the backward pass instead of keeping "
                                   "them: less memory, more compute.")
    optimisation.add_argument("--cache-frozen-layers", action=argparse.BooleanOptionalAction, default=True,
                              help="Compute what the frozen layers below the first trained one give each training "
                                   "and validation example once, rather than at every step of every epoch, if the "
                                   "run goes through the training set at least once and that takes under a tenth "
                                   "of the memory: the same results, faster (default: on).")
    optimisation.add_argument("--compile", action="store_true",
                              help="Compile the training step into fused kernels: faster steps once this machine "
                                   "holds those kernels, but the first compiled run on a machine spends half a "
                                   "minute (CPU) to over a minute (GPU) building them, more than a run of a "
                                   "few thousand steps gains (benchmarks/README.md).")

    checkpoints = p.add_argument_group("checkpoints and reports")
    checkpoints.add_argument("--save-every", type=utils.POSITIVE_INT, default=100,
                             help="Save the adapters, and a checkpoint to resume from, every N iterations.")
    checkpoints.add_argument("--keep-checkpoints", type=utils.NON_NEGATIVE_INT, default=3,
                             help="The run's checkpoints to keep, the latest (0: all).")
    checkpoints.add_argument("--resume", type=utils.expanded_path, metavar="CHECKPOINT",
                             help="Continue a run exactly from a checkpoint folder (runs/N/step-M), with the run's "
                                  "flags.")
    checkpoints.add_argument("--accept-flag-changes", action="store_true",
                             help="With --resume: go on although flags that change the result differ from the "
                                  "checkpoint's.")
    checkpoints.add_argument("--steps-per-report", type=utils.POSITIVE_INT, default=10,
                             help="Iterations between loss reports.")
    checkpoints.add_argument("--report-to", choices=("wandb", "tensorboard"),
                             help="Also send the metrics to Weights & Biases or TensorBoard (its package installed).")

    evaluation = p.add_argument_group("evaluation")
    evaluation.add_argument("--steps-per-eval", type=utils.POSITIVE_INT, default=200,
                            help="Iterations between validations.")
    evaluation.add_argument("--eval-on-start", action="store_true",
                            help="Also validate after the first step, before the rest of training (TRL's "
                                 "eval_on_start; the reference validates there).")
    evaluation.add_argument("--val-batches", type=utils.flag_type(int, lambda v: v >= -1,
                                                                  "an integer of at least 0, or -1 for all"),
                            default=25, help="Validation batches (-1: the whole set; 0: no validation, no "
                                             "valid.jsonl).")
    evaluation.add_argument("--early-stopping-patience", type=utils.POSITIVE_INT, metavar="K",
                            help="Stop training once K validations in a row bring the validation loss no lower than "
                                 "the best so far (less the threshold). Whether or not it is given, each validation "
                                 "that lowers it saves the adapters as the best: ADAPTER.best.safetensors beside "
                                 "--adapter-file, and the run's best/ folder. --test, --prompt and fuse.py read the "
                                 "--adapter-file they are given, the last adapters by default (those --resume goes "
                                 "on from, and never a best file an earlier run left): pass "
                                 "--adapter-file adapters.best.safetensors for the best.")
    evaluation.add_argument("--early-stopping-threshold", type=utils.NON_NEGATIVE, metavar="DELTA",
                            help="With --early-stopping-patience: how much lower than the best the validation loss "
                                 "must be to count as better (default 0).")
    evaluation.add_argument("--test", action="store_true", help="Report loss and perplexity on test.jsonl.")
    evaluation.add_argument("--test-batches", type=utils.POSITIVE_INT_OR_ALL, default=500,
                            help="Test batches (-1: the whole set).")
    evaluation.add_argument("--generate-eval", type=utils.NON_NEGATIVE_INT, default=0, metavar="N",
                            help="With --test: generate the completions of the first N test examples (greedy) and "
                                 "report the exact-match accuracy.")
    evaluation.add_argument("--completion-marker", help='With --generate-eval on {"text"} examples: the completion '
                                                        'is what follows the last occurrence of this marker, e.g. '
                                                        '"A: ".')

    generation = p.add_argument_group("generation")
    generation.add_argument("--prompt", "-p", help="Generate a continuation of this prompt.")
    generation.add_argument("--prompt-file", type=utils.expanded_path, metavar="FILE",
                            help='Answer each prompt of FILE, generated together: one a line, or in a .jsonl file '
                                 'one {"prompt"} or {"messages"} a line (a chat: its template\'s generation prompt '
                                 'after it). The answers go to --output.')
    generation.add_argument("--output", type=utils.expanded_path, metavar="FILE",
                            help="With --prompt-file: the JSONL file to write the answers to, one "
                                 '{"prompt" or "messages", "answer", "finish"} a line, finish "eos", or "length" '
                                 "where --max-tokens cut it (default: FILE's name without its suffix, plus "
                                 ".answers.jsonl).")
    generation.add_argument("--max-tokens", "-m", type=utils.POSITIVE_INT, default=100, help="Tokens to generate.")
    generation.add_argument("--temp", type=utils.NON_NEGATIVE, default=0.8, help="Sampling temperature (0: greedy).")
    generation.add_argument("--top-p", type=utils.TOP_P, default=1.0,
                            help="Nucleus sampling: keep this probability mass.")
    generation.add_argument("--top-k", type=utils.NON_NEGATIVE_INT, default=0,
                            help="Keep the k likeliest tokens (0: all).")
    generation.add_argument("--min-p", type=utils.flag_type(float, lambda v: 0 <= v < 1, "a number from 0, below 1"),
                            default=0.0,
                            help="Keep the tokens at least this times as likely as the likeliest (0: all).")
    return p


def init_lora_weights(text: str) -> str:
    """The type of --init-lora-weights."""
    if not re.fullmatch(r"default|gaussian|olora|pissa(_niter_[1-9][0-9]{0,5})?", text):
        raise argparse.ArgumentTypeError(f"must be default, gaussian, pissa, pissa_niter_N or olora, not {text!r}")
    return text


def parse_args(argv=None):
    """The command line, over the flags of --config's YAML file."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is None:
        check_flags(args)
        return args
    import yaml

    try:
        config = yaml.safe_load(utils.read_text(args.config))
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer past Python's 4300 digits
        raise UserError(f"--config {args.config}: not valid YAML ({utils.first_line(e)})") from None
    if not isinstance(config, dict):
        raise UserError(f"--config {args.config}: expected a mapping of flags to values")
    actions = {a.dest: a for a in parser._actions}
    flags = []
    for key, dest, value in config_flags(config, args.config):
        action = actions.get(dest.replace("-", "_"))
        if action is None or action.dest in ("help", "config"):
            raise UserError(f"--config {args.config}: {key} is not a flag of lora.py, nor a key of mlx-lm's config")
        with utils.naming_flag(f"--config {args.config}: {key}"):
            flags += yaml_flag(action, value)
    args = parser.parse_args(flags + list(sys.argv[1:] if argv is None else argv))
    check_flags(args)
    return args


def yaml_flag(action, value) -> list:
    """The command-line words of a flag that a YAML file gives this value, typed as argparse types the flag: a
    switch takes true or false alone (YAML's "false" in quotes is a string, which would be true), another flag
    text or a number as its type says (or, if it takes several, a list of them), within its choices."""
    flag = next(s for s in action.option_strings if s.startswith("--"))
    shown = json.dumps(value, default=str)
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UserError(f"{flag} is a switch: expected true or false, not {shown}")
        if isinstance(action, argparse._StoreTrueAction):
            return [flag] if value else []
        return [flag if value else "--no-" + flag[2:]]
    several = action.nargs in ("+", "*")
    values = value if several and isinstance(value, list) else [value]
    text = action.type in (None, utils.expanded_path)
    for v in values or [None]:
        if not (isinstance(v, str) or not text and utils.is_number(v)):
            kind = ("text" if text else "a number") + (", or a list of them" if several else "")
            raise UserError(f"{flag}: expected {kind}, not {shown}")
        try:  # a number may come as text: YAML reads 1e-5 (no dot) as a string
            typed = v if text else action.type(str(v))
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{flag}: {e}") from None
        except ValueError:
            raise UserError(f"{flag}: expected {action.type.__name__}, not {shown}") from None
        if action.choices is not None and typed not in action.choices:
            raise UserError(f"{flag}: must be one of {', '.join(map(str, action.choices))}, not {shown}")
    return [flag, *map(str, values)]


# mlx-lm's config keys (mlx_lm.lora's CONFIG_DEFAULTS and lora_config.yaml) that are lora.py's flags by other names
MLX_LM_KEYS = {"num_layers": "lora_layers", "training_mode": "train_mode"}
MLX_LM_LORA_PARAMETERS = {"rank": "lora_rank", "scale": "lora_scale", "dropout": "lora_dropout", "keys": "lora_targets"}
MLX_LM_SCHEDULES = {"cosine_decay": "cosine", "linear_schedule": "linear"}  # as --lr-schedule
MLX_LM_DATASET_KEYS = {"path": "data", "name": "data", "train_split": "train_split", "valid_split": "valid_split",
                       "test_split": "test_split"}  # and the *_feature flags
# mlx-lm's keys that change nothing at this value (mlx-lm's default), and why lora.py cannot honour another
MLX_LM_FIXED = {"clear_cache_threshold": (0, "lora.py does not clear MLX's cache between steps"),
                "trust_remote_code": (False, "lora.py runs no code from a model's repository"),
                "project_name": (None, "lora.py reports to the project lora-mlx")}
MLX_LM_UNSET = {"resume_adapter_file", "lr_schedule", "report_to", "hf_dataset"}  # where mlx-lm reads null as unset


def config_flags(config: dict, source) -> list:
    """(key, flag, value) of each flag that a --config file sets: a key of lora.py's flags as it is, or mlx-lm's
    key (its lora_config.yaml) as the flags that do the same; `key` names it as the file does. A key of mlx-lm's
    that no flag does alike is an error naming it and why."""
    def refused(key, why):
        return UserError(f"--config {source}: {key}: {why}")

    def mapping(key, value, names):
        if not isinstance(value, dict):
            raise refused(key, f"expected a mapping of {', '.join(sorted(set(names)))} to values")
        unknown = [k for k in value if k not in names]
        if unknown:
            raise refused(f"{key}: {unknown[0]}", f"lora.py reads no other key of {key} than {', '.join(names)}")
        return [(f"{key}: {k}", names[k], v) for k, v in value.items()]

    flags = []
    for key, value in config.items():
        key = str(key)
        if key in MLX_LM_FIXED:
            if value != MLX_LM_FIXED[key][0]:
                raise refused(key, f"{MLX_LM_FIXED[key][1]} (only {json.dumps(MLX_LM_FIXED[key][0])} is read)")
        elif value is None and key in MLX_LM_UNSET:
            continue
        elif key == "learning_rate" and isinstance(config.get("lr_schedule"), dict):
            continue  # mlx-lm ignores it: the schedule's first argument is the learning rate
        elif key == "lora_parameters":
            flags += mapping(key, value, MLX_LM_LORA_PARAMETERS)
        elif key == "lr_schedule" and isinstance(value, dict):
            flags += mlx_lm_schedule(value, config.get("iters", 1000), refused)
        elif key == "optimizer_config":
            optimizer = str(config.get("optimizer", "adam"))
            flags += mapping(f"{key}: {optimizer}", (value or {}).get(optimizer) or {} if isinstance(value, dict)
                             else value, {"weight_decay": "weight_decay"})
        elif key == "adapter_path":  # a folder, which mlx-lm writes adapters.safetensors in
            flags.append((key, "adapter_file", os.path.join(value, DEFAULT_ADAPTER_FILE) if isinstance(value, str)
                          else value))
        elif key == "hf_dataset":
            entries = value if isinstance(value, list) else [value]
            if len(entries) != 1:
                raise refused(key, f"{len(entries)} datasets: lora.py trains on one")
            dataset = mapping(key, entries[0], {**MLX_LM_DATASET_KEYS, **{flag: flag for flag in FEATURE_FLAGS}})
            # mlx-lm's splits where the file gives none
            flags += [(key, "train_split", "train[:80%]"), (key, "valid_split", "train[-10%:]"), *dataset]
        else:
            flags.append((key, MLX_LM_KEYS.get(key, key), "sft" if key == "training_mode" and value == "normal"
                          else value))
    return flags


def mlx_lm_schedule(schedule: dict, iters, refused) -> list:
    """The flags of mlx-lm's lr_schedule (mlx_lm.tuner.utils.build_schedule): its name, an MLX schedule, with
    its arguments, after a linear warmup from warmup_init. lora.py's schedules decay to 0 at --iters after a
    warmup from 0: a schedule of mlx-lm's that does not is an error."""
    known = ("name", "arguments", "warmup", "warmup_init")
    unknown = [k for k in schedule if k not in known]
    if unknown:
        raise refused(f"lr_schedule: {unknown[0]}",
                      f"lora.py reads no other key of lr_schedule than {', '.join(known)}")
    name, arguments = schedule.get("name"), schedule.get("arguments")
    if name not in MLX_LM_SCHEDULES:
        raise refused("lr_schedule: name", f"{json.dumps(name, default=str)}: lora.py's schedules are those of "
                                           f"mlx-lm's {either(list(MLX_LM_SCHEDULES))} alone")
    try:  # YAML reads 1e-5 (no dot) as text
        numbers = [float(a) for a in arguments]
        warmup, warmup_init = float(schedule.get("warmup", 0)), float(schedule.get("warmup_init", 0))
        iters = int(iters)
    except (TypeError, ValueError):
        raise refused("lr_schedule", "expected numbers: arguments (a list of them), warmup, warmup_init and "
                                     "iters") from None
    if len(numbers) not in ((2, 3) if name == "cosine_decay" else (3,)):
        raise refused("lr_schedule: arguments", f"expected {name}'s " + ("[initial rate, decay steps, final rate]"
                      if name == "cosine_decay" else "[initial rate, final rate, steps]"))
    steps, end = (numbers[1], (numbers + [0.0])[2]) if name == "cosine_decay" else (numbers[2], numbers[1])
    if warmup_init:
        raise refused("lr_schedule: warmup_init", f"{schedule['warmup_init']}: lora.py's warmup starts from 0")
    if end:
        raise refused("lr_schedule: arguments", f"the schedule ends at {end}: lora.py's decays to 0")
    if steps != iters - warmup:
        raise refused("lr_schedule: arguments", f"the decay takes {steps:g} steps: lora.py's takes those after the "
                                                f"warmup, iters - warmup = {iters - warmup:g}")
    return [("lr_schedule: name", "lr_schedule", MLX_LM_SCHEDULES[name]),
            ("lr_schedule: warmup", "warmup", schedule.get("warmup", 0)),
            ("lr_schedule: arguments", "learning_rate", arguments[0])]


def check_flags(args):
    """Errors in how the flags go together, before any data or model is read (each flag's own range is its
    argparse type's)."""
    if args.list_targets:
        return
    adapter_file = Path(args.adapter_file or DEFAULT_ADAPTER_FILE)
    if adapter_file.suffix not in (".safetensors", ".npz") and (args.train or not adapter_file.is_dir()):
        raise UserError(f"--adapter-file {adapter_file}: the extension must be .safetensors or .npz "
                        f"(without --train, an adapter folder of mlx-lm or PEFT is read too)")
    if args.train and Path(args.model).exists() and utils.is_within(adapter_file, Path(args.model)):
        raise UserError(f"--adapter-file {adapter_file}: is inside --model {args.model}, which training must not "
                        f"write into; save the adapters elsewhere")
    read = objective_flags(OBJECTIVES[args.train_mode])
    for name in OBJECTIVE_FLAGS:
        if getattr(args, name) is not None and name not in read:
            modes = [mode for mode, objective in OBJECTIVES.items() if name in objective_flags(objective)]
            raise UserError(f"--{name.replace('_', '-')} goes with --train-mode {either(modes)}")
    loss_types = getattr(OBJECTIVES[args.train_mode], "loss_types", ())
    if args.loss_type is not None and args.loss_type not in loss_types:
        raise UserError(f"--loss-type {args.loss_type}: --train-mode {args.train_mode} takes {either(loss_types)}")
    if args.weight_decay and args.optimizer == "adam":
        raise UserError("--weight-decay needs --optimizer adamw, or another with weight decay (Adam has none)")
    if args.early_stopping_threshold is not None and args.early_stopping_patience is None:
        raise UserError("--early-stopping-threshold goes with --early-stopping-patience")
    if args.early_stopping_patience and args.val_batches == 0:
        raise UserError("--early-stopping-patience stops on the validation loss: it needs --val-batches above 0")
    if args.use_rslora and args.lora_alpha is None:
        raise UserError("--use-rslora: give --lora-alpha (rsLoRA's scale is alpha / sqrt(rank), not --lora-scale)")
    if args.init_lora_weights != "default" and (args.fine_tune_type != "lora" or args.resume_adapter_file):
        raise UserError(f"--init-lora-weights {args.init_lora_weights}: starts new LoRA adapters (--fine-tune-type "
                        f"lora, no --resume-adapter-file)")
    if args.lora_plus_ratio is not None and args.fine_tune_type == "full":
        raise UserError("--lora-plus-ratio: sets the adapters' B learning rate; --fine-tune-type full has none")
    if not (args.train or args.test or args.prompt is not None or args.prompt_file):
        raise UserError("nothing to do: give --train, --test, --prompt and/or --prompt-file")
    if args.output and not args.prompt_file:
        raise UserError("--output is where --prompt-file's answers go: give --prompt-file too")
    if args.generate_eval and not args.test:
        raise UserError("--generate-eval evaluates the test set: give --test too")
    if args.resume and args.resume_adapter_file:
        raise UserError("--resume continues a checkpoint's whole state: leave out --resume-adapter-file")
    if args.resume and not Path(args.resume).is_dir():
        raise UserError(f"--resume {args.resume}: no such checkpoint folder")
    if args.accept_flag_changes and not args.resume:
        raise UserError("--accept-flag-changes goes with --resume")
    for flag, text in (("--prompt", args.prompt), ("--completion-marker", args.completion_marker)):
        # bytes of an argument that are not UTF-8 come as surrogates, which the tokenizer refuses
        bad = next((i for i, c in enumerate(text or "") if "\ud800" <= c <= "\udfff"), None)
        if bad is not None:
            raise UserError(f"{flag}: not UTF-8 text (character {bad + 1})")
    if args.prompt == "":
        raise UserError("--prompt: empty; give the text to continue")
    if args.completion_marker is not None and not args.completion_marker.strip():
        raise UserError(f"--completion-marker {args.completion_marker!r}: has no text besides spaces")
    if args.report_to:
        package = {"wandb": "wandb", "tensorboard": "tensorboardX"}[args.report_to]
        try:
            __import__(package)
        except ImportError:
            raise UserError(f"--report-to {args.report_to}: the {package} package is not installed "
                            f"(pip install {package})") from None


@dataclasses.dataclass(frozen=True)
class TrainingArgs:
    """What training reads of the flags, typed (as mlx-lm's TrainingArgs); training_args makes it from the
    command line, once."""
    objective: "Objective"  # what --train-mode trains on, with the flags it reads
    iters: int
    batch_size: int
    grad_accumulation_steps: int
    learning_rate: float
    optimizer: str  # adam or adamw
    weight_decay: float
    lora_plus_ratio: float | None  # LoRA+: the learning rate of the adapters' B over the others'
    lr_schedule: str  # constant, linear or cosine
    warmup: int
    max_grad_norm: float | None
    seed: int
    pack: bool
    sort_by_length: bool
    cache_frozen_layers: bool
    compile: bool  # the training step (make_step)
    val_batches: int  # -1: the whole set
    steps_per_eval: int
    eval_on_start: bool
    early_stopping_patience: int | None  # None: no early stopping
    early_stopping_threshold: float | None
    steps_per_report: int
    save_every: int
    keep_checkpoints: int  # 0: all
    resume: str | None  # the checkpoint that the run goes on from
    report_to: str | None
    reload_from: str | None  # where the weights released while training are read back from after it (None: not)
    flags: dict  # the command line's, as checkpoints and --report-to record them


def training_args(args) -> TrainingArgs:
    """The TrainingArgs of the command line (argparse's namespace)."""
    flags = dict(vars(args))
    named = {field.name: flags[field.name] for field in dataclasses.fields(TrainingArgs) if field.name in flags}
    # the released weights are read back (seconds, for a large model) where --test or --prompt use the model next
    reload_from = args.model if args.test or args.prompt is not None or args.prompt_file else None
    return TrainingArgs(**named, objective=objective_of(flags), reload_from=reload_from, flags=flags)


def either(names) -> str:
    """"a", "a or b", "a, b or c"."""
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def lora_scale(flags: dict) -> float:
    """The adapters' scale that the flags (vars(args)) set: --lora-scale, or --lora-alpha / --lora-rank (rsLoRA:
    / sqrt(--lora-rank))."""
    if flags.get("lora_alpha") is None:
        return flags["lora_scale"]
    return flags["lora_alpha"] / (math.sqrt(flags["lora_rank"]) if flags.get("use_rslora") else flags["lora_rank"])


# Data


def is_messages(value):
    """A chat: a non-empty list of {"role", "content"} messages (content a string or a list of parts, or none
    where the message calls tools)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and (isinstance(m.get("content"), (str, list)) or m.get("content") is None and m.get("tool_calls"))
        for m in value)


# The keys that make each format (example_format); a record with keys of two formats is refused, as no
# reading of it is sure, and other keys are ignored
FORMAT_KEYS = {"text": {"text"}, "completion": {"prompt", "completion"}, "preference": {"prompt", "chosen", "rejected"},
               "chat": {"messages"}, "prompt": {"prompt"}}


def format_keys(record) -> set:
    """The keys of a record that say its format (FORMAT_KEYS), but those that are null: tables exported to JSON
    write a column that a row lacks as null."""
    return {k for keys in FORMAT_KEYS.values() for k in keys if record.get(k) is not None}


def is_reply(value):
    """One assistant message, in a list: a chat's response."""
    return is_messages(value) and len(value) == 1 and value[0]["role"] == "assistant"


def example_format(record):
    """"text", "completion" ({"prompt", "completion"}: two strings, or a chat and one assistant message),
    "preference" ({"prompt", "chosen", "rejected"}: three strings, or a chat and one assistant message each),
    "chat" ({"messages"[, "tools"]}) or "prompt" ({"prompt"} alone, a string or a chat); None if neither."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return "text"
    prompt, completion, pair = record.get("prompt"), record.get("completion"), (record.get("chosen"),
                                                                               record.get("rejected"))
    if isinstance(prompt, str) and isinstance(completion, str) or is_messages(prompt) and is_reply(completion):
        return "completion"
    if isinstance(prompt, str) and all(isinstance(r, str) for r in pair) or is_messages(prompt) and all(
            is_reply(r) for r in pair):
        return "preference"
    if is_messages(record.get("messages")) and isinstance(record.get("tools") or [], list):
        return "chat"
    if (isinstance(prompt, str) or is_messages(prompt)) and completion is None and pair == (None, None):
        return "prompt"
    return None


def exchange(prompt, response, tools=None):
    """What encode() reads of a prompt and a response to it: the two texts, or the chat and its assistant
    message as one chat."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": response}
    return {"messages": prompt + response, "tools": tools}


class Examples(list):
    """The records of a data set, its name (`path`: the .jsonl file, or the dataset and split) and the line or
    row each came from (for errors found later)."""

    def __init__(self, records, path, lines, unit="line"):
        super().__init__(records)
        self.path, self.lines, self.unit = path, lines, unit

    def where(self, i):
        return record_place(self.path, self.unit, self.lines[i])


def record_place(name, unit, number) -> str:
    """A line of a .jsonl file (unit "line"), or a row of a dataset's split (unit "row"), as errors name it."""
    return f"{name}:{number}" if unit == "line" else f"{name} row {number}"


# what example_format's kinds of record are called in errors
KIND_NAMES = {"text": "text example", "completion": "completion example", "preference": "preference pair",
              "chat": "chat example", "prompt": "prompt-only example"}

# the splits of a Hugging Face dataset that are the train, valid and test sets where --train-split, ... give none:
# the names that datasets gives files named so, then those of mlx-lm's datasets on the hub ("valid")
DATASET_SPLITS = {"train": ("train",), "valid": ("validation", "valid"), "test": ("test",)}
# the flags that name the column holding a format's key (mlx-lm's *_feature), and that key
FEATURE_FLAGS = {"text_feature": "text", "prompt_feature": "prompt", "completion_feature": "completion",
                 "chat_feature": "messages", "chosen_feature": "chosen", "rejected_feature": "rejected"}
# the files that --data reads as a Hugging Face dataset, by the datasets builder that reads them
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def dataset_source(data):
    """What datasets.load_dataset reads --data as (its keywords): a folder of data files (DATA_FILE_BUILDERS) but
    no train.jsonl, valid.jsonl or test.jsonl, such a file, or else, where the name can be one, a Hugging Face
    hub id; None for a folder of .jsonl files (or none, which is an error later)."""
    path = Path(data)
    if path.is_dir():
        jsonl = any((path / f"{split}.jsonl").exists() for split in DATASET_SPLITS)
        data_files = any(p.suffix in DATA_FILE_BUILDERS for p in path.rglob("*") if p.is_file())
        return {"path": str(path)} if data_files and not jsonl else None
    if path.is_file():
        if path.suffix not in DATA_FILE_BUILDERS:
            raise UserError(f"--data {data}: a file, but not {either(list(DATA_FILE_BUILDERS))} data; give a folder "
                            f"of train.jsonl, valid.jsonl and test.jsonl, or a Hugging Face dataset")
        return {"path": DATA_FILE_BUILDERS[path.suffix], "data_files": str(path)}
    if re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", str(data)):
        return {"path": str(data)}
    return None


def without_nulls(value):
    """A value of a dataset's row less its null keys: a table gives each of its structs (a chat's message, a
    tool) every field that any of them has, null where it has none, which a chat template reads as given."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


@contextlib.contextmanager
def torch_unhidden():
    """Within: PyTorch not hidden as utils.set_up_process hides it (None in sys.modules), which datasets' hashing
    reads as imported, and imports (datasets goes without PyTorch, as it found none when it was imported)."""
    hidden = "torch" in sys.modules and sys.modules["torch"] is None
    if hidden:
        del sys.modules["torch"]
    try:
        yield
    finally:
        if hidden:
            sys.modules.setdefault("torch", None)


def dataset_rows(data, source, split, given):
    """(the split's name, its rows) of a Hugging Face dataset: the split `given` (--train-split, ...), else the
    first of DATASET_SPLITS[split] that the dataset has."""
    import datasets
    import huggingface_hub

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors logged are those raised: one line here
    huggingface_hub.utils.logging.set_verbosity_error()  # its retries where the hub is out of reach
    datasets.disable_progress_bars()  # its bars of the splits it writes to its cache, each a line of its own
    flag = f"--{split}-split"
    names = [given] if given else DATASET_SPLITS[split]
    for name in names:
        try:
            datasets.ReadInstruction.from_spec(name)
        except ValueError as e:  # a slice it cannot read
            raise UserError(f"{flag} {name}: {utils.first_line(e)}") from None
        try:
            with torch_unhidden():
                return name, datasets.load_dataset(**source, split=name)
        except Exception as e:  # what the hub, the network, a file's reader or the split's name raise
            message = utils.first_line(e)
            if isinstance(e, ValueError) and message.startswith("Unknown split"):
                missing = message
            elif "data_files" not in source and not Path(data).exists():
                raise UserError(f"--data {data}: no such folder or file, and the Hugging Face dataset {data} could "
                                f"not be reached or found ({type(e).__name__}: {message})") from None
            else:
                raise UserError(f"--data {data}: cannot be read as a Hugging Face dataset ({type(e).__name__}: "
                                f"{message})") from None
    raise UserError(f"{flag}: {data} has no split {either(names)} ({missing}); name the {split} set's with {flag} "
                    f"(a slice such as train[:10%] too)")


def read_records(data, split, dataset_splits=None):
    """(name, [(number, record)], unit): the records of --data's train, valid or test set: the lines of
    DATA/split.jsonl (unit "line"), or the rows of a Hugging Face dataset's split (unit "row"; dataset_splits
    gives the --*-split flags by set). `name` names the set in errors."""
    dataset_splits = dataset_splits or {}
    source = dataset_source(data)
    if source is None:
        given = [f"--{s}-split" for s, name in dataset_splits.items() if name]
        if given:
            raise UserError(f"{given[0]}: chooses a split of a Hugging Face dataset, and --data {data} is read as "
                            f"train.jsonl, valid.jsonl and test.jsonl")
        path = Path(data) / f"{split}.jsonl"
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        return path, utils.read_jsonl(path), "line"
    name, rows = dataset_rows(data, source, split, dataset_splits.get(split))
    return f"{data} (split {name})", [(i, without_nulls(row)) for i, row in enumerate(rows)], "row"


def load_dataset(data_dir, split, mask_prompt=False, objective=None, columns=None, dataset_splits=None):
    """The examples of --data's train, valid or test set (read_records), all of one format (see example_format),
    checked before any model is loaded: records the objective (default SFT) learns from (with mask_prompt, of a
    format that has a prompt). `columns` maps a format's keys to the columns that hold them (--*-feature)."""
    objective = objective or SFT()
    path, records, unit = read_records(data_dir, split, dataset_splits)
    columns = {key: column for key, column in (columns or {}).items() if column not in (None, key)}
    flags = {key: "--" + flag.replace("_", "-") for flag, key in FEATURE_FLAGS.items()}
    mapped = "".join(f" ({flags[key]} {column})" for key, column in columns.items())
    # the keys of the formats that the columns named are keys of: the others are other columns here (a chat's
    # --chat-feature chosen beside the prompt and rejected columns of a preference pair)
    wanted = set().union(*(keys for keys in FORMAT_KEYS.values() if keys & columns.keys())) - columns.keys()
    other = set().union(*FORMAT_KEYS.values()) - wanted
    examples, lines, first, unread = [], [], None, dict(columns)
    for number, record in records:
        where = record_place(path, unit, number)
        if isinstance(record, dict) and columns:  # the columns named, under their keys, in place of the keys'
            unread = {key: column for key, column in unread.items() if column not in record}
            record = {**{k: v for k, v in record.items() if k not in other},
                      **{key: record[column] for key, column in columns.items() if column in record}}
        keys = format_keys(record) if isinstance(record, dict) else set()
        if not any(keys <= format for format in FORMAT_KEYS.values()):
            raise UserError(f"{where}: holds the keys of more than one format ({', '.join(sorted(keys))}); "
                            f"give each example in one")
        kind = example_format(record)
        if kind is None and unread:
            key, column = next(iter(unread.items()))
            raise UserError(f"{flags[key]} {column}: {where} has no such column, nor has a {unit} before it")
        if kind is None:
            raise UserError(f"{where}: not {objective.expected}{mapped}")
        if kind not in objective.formats:
            raise UserError(f"{where}: {objective.refusal(kind)}{mapped}")
        if first is None:
            first = (kind, number)
        elif kind != first[0]:
            raise UserError(f"{where}: a {kind} example, but {unit} {first[1]} is a {first[0]} example "
                            f"(one format per file)")
        wrong = objective.check(record)
        if wrong:
            raise UserError(f"{where}: {wrong}")
        if mask_prompt and kind == "chat" and not any(m["role"] == "assistant" for m in record["messages"]):
            raise UserError(f"{where}: no assistant message, and --mask-prompt trains on those alone")
        # the example as encode() reads it: the keys of its format alone, a chat's tools, and what the objective
        # reads besides (GRPO: every column, for its reward functions)
        kept = FORMAT_KEYS[kind] | {"tools"} | objective.record_keys
        examples.append({k: v for k, v in record.items() if k in kept or objective.generates})
        lines.append(number)
    if not examples:
        raise UserError(f"{path}: no examples")
    if unread:
        key, column = next(iter(unread.items()))
        raise UserError(f"{flags[key]} {column}: no {unit} of {path} has that column")
    if mask_prompt and first[0] == "text":
        raise UserError(f'--mask-prompt: {path} holds plain text examples; it needs {{"prompt", "completion"}} '
                        f'or {{"messages"}} examples')
    return Examples(examples, path, lines, unit)


def encode(record, tokenizer, add_eos, trained="completion"):
    """(tokens, spans): the spans (start, end) of the tokens that training scores: with trained="all", all of
    them; with "completion", a {"prompt", "completion"} example's completion, or a chat's last assistant
    message; with "assistant", a chat's assistant messages, each (TRL's assistant_only_loss). Chats are rendered
    with the tokenizer's chat template (chat_tokens)."""
    if "messages" in record:
        with utils.bounded(*TEMPLATE_LIMITS):  # the sandbox lets a template loop without end
            return chat_tokens(record["messages"], record.get("tools"), tokenizer, trained)
    if "prompt" in record:
        prompt = tokenizer.encode(record["prompt"])
        tokens = prompt + tokenizer.encode(record["completion"], add_special_tokens=False)
    else:
        tokens, prompt = tokenizer.encode(record["text"]), []
    if add_eos and tokens[-1:] != [tokenizer.eos_token_id]:
        tokens.append(tokenizer.eos_token_id)
    return tokens, [(0 if trained == "all" else len(prompt), len(tokens))]


# the markers of a chat template around the assistant's tokens, as TRL's training templates have them
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_tokens(messages, tools, tokenizer, trained):
    """encode() of a chat. Where the chat template marks the assistant's tokens ({% generation %}), they are
    those it marks (as in TRL). Else an assistant message runs from the end of the chat before it, rendered with
    the generation prompt, to the end of the chat up to it; which is right where the template renders those
    chats as the beginnings of the whole one. Where it does not for an earlier assistant message (Qwen3's drops
    the reasoning of earlier turns), that message is not scored (tokenize warns); for the last, an error."""
    def render(messages, **kwargs):
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
        return tokenizer.encode(text, add_special_tokens=False)

    if trained != "all" and GENERATION_MARKER.search(str(tokenizer.chat_template)):
        chat = tokenizer.apply_chat_template(messages, tools=tools, return_dict=True, return_assistant_tokens_mask=True)
        edges = np.flatnonzero(np.diff([0, *chat["assistant_masks"], 0])).reshape(-1, 2)  # where runs of 1 start, end
        if not len(edges):
            raise UserError(f"the chat template of {tokenizer.name_or_path} marks none of its tokens as the "
                            f"assistant's ({{% generation %}})")
        spans = [(int(start), int(end)) for start, end in edges]
        return list(chat["input_ids"]), spans if trained == "assistant" else spans[-1:]
    tokens = render(messages)
    if trained == "all":
        return tokens, [(0, len(tokens))]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    for i in turns if trained == "assistant" else turns[-1:]:
        before = render(messages[:i], add_generation_prompt=True) if i else []
        through = render(messages[:i + 1]) if i + 1 < len(messages) else tokens
        if tokens[:len(before)] != before or tokens[:len(through)] != through:
            if i != turns[-1]:
                continue
            raise UserError(f"the chat template of {tokenizer.name_or_path} renders the messages up to the "
                            f"assistant's message {i + 1} otherwise than within the whole chat, so which tokens are "
                            f"the assistant's is unknown; a template that marks them ({{% generation %}}) tells")
        spans.append((len(before), len(through)))
    return tokens, spans


def training_row(tokens, spans, max_length):
    """(tokens, scored), the first max_length tokens: scored is the first target that counts where the spans
    that training scores (encode) are one, else which targets count (make_batch)."""
    if len(spans) == 1:
        return tokens[:max_length], max(spans[0][0] - 1, 0)
    scored = np.zeros(len(tokens) - 1, bool)
    for start, end in spans:
        scored[max(start - 1, 0):end - 1] = True  # the target before a token is that token
    return tokens[:max_length], scored[:max_length - 1]


def scored_targets(tokens, scored):
    """Which targets of a row (tokens, scored) count: those from the first that does, or as the mask says."""
    return np.arange(len(tokens) - 1) >= scored if np.isscalar(scored) else scored


class Rows(list):
    """The rows of a tokenized set (tokenize), and `labels`: per example, its record's label where the
    objective reads one (Objective.label), else None."""

    def __init__(self, rows, labels=None):
        super().__init__(rows)
        self.labels = labels

    def head(self, examples, rows_per_example):
        """The rows and labels of the first `examples` examples (all, where there are fewer)."""
        return self.of(range(min(examples, len(self) // rows_per_example)), rows_per_example)

    def of(self, examples, rows_per_example):
        """The rows and labels of these examples (their indices)."""
        return Rows([self[rows_per_example * i + r] for i in examples for r in range(rows_per_example)],
                    None if self.labels is None else self.labels[np.asarray(examples, int)])


def tokenize(examples, tokenizer, add_eos, max_length, name, mask_prompt=False, objective=None):
    """The Rows (tokens, scored) of the examples (training_row), the objective's (default SFT) rows_per_example
    an example, one after the other (Objective.responses, Objective.rows): an SFT example's every token scored,
    or with mask_prompt the completion or a chat's assistant messages alone; a preference pair's two rows, its
    chosen response's then its rejected one's, each scored on the response alone."""
    objective = objective or SFT()
    chat = "messages" in examples[0] or isinstance(examples[0].get("prompt"), list)
    if chat and not tokenizer.chat_template:
        raise UserError(f"{getattr(examples, 'path', f'the {name} set')}: chat examples, and the tokenizer of "
                        f"{tokenizer.name_or_path} has no chat template")
    if objective.generates:  # prompts alone: the completions are the model's own
        return objective.prompt_rows(examples, tokenizer, max_length, name)
    if add_eos and not chat and tokenizer.eos_token_id is None:
        raise UserError(f"--add-eos-token: the tokenizer of {tokenizer.name_or_path} has no end-of-sequence token "
                        f"(eos_token); give --add-eos-token 0")
    where = getattr(examples, "where", lambda i: f"the {name} set's example {i + 1}")
    trained = objective.trained(mask_prompt)
    groups, unscored = [], 0
    counted = trained == "assistant" and not GENERATION_MARKER.search(str(tokenizer.chat_template))
    for i, record in enumerate(examples):
        try:
            groups.append([encode(r, tokenizer, add_eos, trained) for r in objective.responses(record)])
            if counted:
                unscored += len(groups[-1][0][1]) < sum(m["role"] == "assistant" for m in record.get("messages", ()))
        except UserError as e:
            raise UserError(f"{where(i)}: {e}") from None
        except Exception as e:  # a chat template raises what its Jinja code raises, or refuses (sandboxed)
            what = f"the chat template of {tokenizer.name_or_path} fails on it" if chat else "cannot be tokenized"
            raise UserError(f"{where(i)}: {what} ({type(e).__name__}: {utils.first_line(e)})") from None
    groups = objective.rows(groups)
    if unscored:
        print(f"[WARNING] --mask-prompt: in {unscored} {name} chats the chat template renders an earlier assistant "
              f"message otherwise than within the whole chat; only their assistant messages rendered alike are "
              f"trained (the last one always). A template that marks them ({{% generation %}}) trains all.")
    # what follows the last scored token (a chat's messages after the assistant's last) changes no loss
    groups = [[(tokens[:spans[-1][1]], spans) for tokens, spans in group] for group in groups]
    long = sum(any(len(tokens) > max_length for tokens, _ in group) for group in groups)
    if long:
        print(f"[WARNING] {long} of {len(groups)} {name} examples are longer than --max-seq-length "
              f"{max_length} tokens and were truncated.")
    groups = [[training_row(tokens, spans, max_length) for tokens, spans in group] for group in groups]
    kept = [i for i, group in enumerate(groups) if all(scored_targets(*row).any() for row in group)]
    if len(kept) < len(groups):
        print(f"[WARNING] {len(groups) - len(kept)} {name} examples have no token to train on (their prompt "
              f"fills --max-seq-length) and were left out.")
    labels = [objective.label(record) for record in examples]
    return Rows([row for i in kept for row in groups[i]], None if None in labels else np.array(labels)[kept])


# Batches


def batch_order(dataset, batch_size, train, seed, epoch, sort):
    """The examples of each batch, in the order batches come. Training shuffles each epoch (the order depends
    on the seed and the epoch alone, so that a resumed run sees the batches the whole run would have) and
    leaves out the last partial batch. With sort, batches hold examples of similar lengths (sorted within
    windows of 64 batches), in shuffled order: less padding."""
    if not train:
        return [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(dataset))
    batches = len(order) // batch_size
    if sort:
        window = 64 * batch_size
        order = np.concatenate([sorted(order[i:i + window], key=lambda j: len(dataset[j][0]))
                                for i in range(0, len(order), window)])
        return [order[i * batch_size:(i + 1) * batch_size].tolist() for i in rng.permutation(batches)]
    return [order[i * batch_size:(i + 1) * batch_size].tolist() for i in range(batches)]


class Batch(NamedTuple):
    """Rows of tokens as the model reads them (make_batch): the inputs, the targets they predict, which targets
    count (scored) and, packed, where each example is in the one row (models.packed_layout)."""
    inputs: mx.array
    targets: mx.array
    scored: mx.array
    packing: dict | None = None


def make_batch(rows, pack, by_example=None) -> Batch:
    """The Batch of rows of (tokens, scored[, first state]) (training_row): scored says which targets count.
    With a first state (frozen_layers_cached), the inputs are the positions' rows in the model's frozen_prefix,
    not tokens. With pack, the rows are concatenated into one and `packing` says where each example is
    (models.packed_layout). Rows are padded to a multiple of 8 tokens on the CPU, of 32
    elsewhere: each new shape is compiled anew, and on a GPU, where a small batch waits on the host, fewer
    shapes gain more than the padding costs (benchmarks/README.md)."""
    pairs = []
    for tokens, scored, *first_state in rows:
        inputs = np.arange(first_state[0], first_state[0] + len(tokens) - 1) if first_state else tokens[:-1]
        pairs.append((inputs, tokens[1:], scored_targets(tokens, scored)))
    lengths = [len(inputs) for inputs, _, _ in pairs]
    if pack:
        width, packing = models.packed_layout(lengths, by_example)
        pairs = [tuple(np.concatenate(parts) for parts in zip(*pairs))]
    else:
        multiple = 8 if mx.default_device() == mx.cpu else 32
        width = -(-max(lengths) // multiple) * multiple
    inputs, targets, scored = np.zeros((3, len(pairs), width), np.int32)
    for k, row in enumerate(pairs):
        for array, values in zip((inputs, targets, scored), row):
            array[k, :len(values)] = values
    return Batch(mx.array(inputs), mx.array(targets), mx.array(scored.astype(bool)), packing if pack else None)


class Sequences(NamedTuple):
    """Rows whose scored targets' log-probabilities are summed row by row (sequence_logps): their Batch, which
    row each position is of (owner), and how many rows there are."""
    rows: Batch
    owner: mx.array
    count: int


def sequences(rows, pack, by_example=None) -> Sequences:
    """The Sequences of these rows (make_batch's)."""
    batch = make_batch(rows, pack, by_example)
    if pack:
        lengths = [len(tokens) - 1 for tokens, *_ in rows]
        owner = np.zeros(batch.inputs.shape, np.int32)
        owner[0, :sum(lengths)] = np.repeat(np.arange(len(rows)), lengths)
    else:
        owner = np.broadcast_to(np.arange(len(rows), dtype=np.int32)[:, None], batch.inputs.shape)
    return Sequences(batch, mx.array(owner), len(rows))


def iterate_batches(dataset, batch_size, train=False, seed=0, start=0, pack=False, sort=False, objective=None,
                    given=None, by_example=None):
    """The objective's (default SFT) batches (Objective.batch, packed as by_example says) of the examples in order
    (batch_order), batch_size examples each: an example is its rows_per_example consecutive rows of the dataset
    (tokenize), and carries its row of `given` (Objective.prepare). Training repeats forever from its
    `start`-th batch, evaluation covers the set once. In a distributed run each rank makes its share of every
    global batch (rank_share): None where that is no example (evaluation's last batch)."""
    objective = objective or SFT()
    k = objective.rows_per_example
    examples = dataset[::k]  # an example's place in the order: its first row's
    epoch, skip = divmod(start, len(examples) // batch_size) if train else (0, 0)
    while True:
        for batch in batch_order(examples, batch_size, train, seed, epoch, sort)[skip:]:
            batch = rank_share(batch)
            if not batch:
                yield None
            else:  # the examples' first rows, then their second rows, ...
                yield objective.batch([dataset[k * j + r] for r in range(k) for j in batch],
                                      None if given is None else given[batch], pack, by_example)
        if not train:
            return
        epoch, skip = epoch + 1, 0


def examples_read(dataset, batch_size, seed, sort, batches, rows_per_example=1):
    """The examples (their indices, in order) of the first `batches` training batches that iterate_batches
    gives; None where that is every example."""
    examples = dataset[::rows_per_example]
    read, epoch = set(), 0
    while batches > 0 and len(read) < len(examples):
        order = batch_order(examples, batch_size, True, seed, epoch, sort)[:batches]
        read.update(i for batch in order for i in batch)
        batches, epoch = batches - len(order), epoch + 1
    return None if len(read) == len(examples) else np.array(sorted(read))


def rank_slices(count):
    """Where each rank's share of `count` items is, rank by rank: N consecutive parts (all of them outside a
    distributed run)."""
    n = mx.distributed.init().size()
    return [slice(count * r // n, count * (r + 1) // n) for r in range(n)]


def rank_share(items):
    """This rank's part of a global batch's items (rank_slices)."""
    return items[rank_slices(len(items))[mx.distributed.init().rank()]]


def gathered(share, sizes):
    """Every rank's rows, gathered in order on every rank: each rank holds the rows of its share (rank_share)
    of some items, item i having sizes[i] rows (outside a distributed run, the share is all of them)."""
    group = mx.distributed.init()
    if group.size() == 1:
        return share
    counts = [int(np.sum(sizes[part])) for part in rank_slices(len(sizes))]
    padded = mx.pad(share, [(0, max(counts) - share.shape[0])] + [(0, 0)] * (share.ndim - 1))  # alike for all
    parts = mx.distributed.all_gather(padded, group=group).reshape(group.size(), max(counts), *share.shape[1:])
    rows = mx.concatenate([parts[r, :count] for r, count in enumerate(counts)])
    mx.eval(rows)
    return rows


# The frozen layers below the trained ones, computed once


def first_trained_layer(model):
    """The first decoder layer that trains: 0 where the embedding does, past the last where the output layer alone
    does (the frozen prefix then holds the last layer's output)."""
    return min(int(name.split(".")[2]) if name.startswith("model.layers.") else
               len(model.layers) if name.startswith("lm_head.") else 0
               for name, _ in tree_flatten(model.trainable_parameters()))


def memory_size():
    """Bytes of memory the device has: a GPU's own (Metal's unified memory_size, CUDA's total_memory), else
    the machine's."""
    info = mx.device_info()
    return (info.get("memory_size") or info.get("total_memory")
            or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def frozen_prefix(model, datasets):
    """(models.FrozenPrefix, datasets) where the frozen layers below the first trained one are some and their
    output for every example of `datasets` takes under a tenth of the device's memory, the datasets' rows then
    each with its first row of the prefix's states (make_batch); else (None, datasets). In a distributed run
    each rank computes the states of a share of the examples, and all ranks gather all of them."""
    group = mx.distributed.init()
    layer, rows = first_trained_layer(model), [row for dataset in datasets for row in dataset]
    lengths = np.array([len(tokens) - 1 for tokens, _ in rows])
    size = lengths.sum() * model.args.hidden_size * model.model[model.args.final_norm].weight.dtype.size
    fits = mx.distributed.all_min(mx.array(size <= memory_size() / 10), group=group).item()  # one choice for all
    if layer == 0 or not fits:
        return None, datasets
    say(f"Computing the frozen layers 0-{layer - 1} once for {len(rows)} examples ({size / 1e9:.2f} GB)")
    states = gathered(frozen_states(model, layer, rank_share(rows)), lengths)
    firsts = iter(np.cumsum(lengths) - lengths)
    return models.FrozenPrefix(layer, states), [Rows([(*row, int(next(firsts))) for row in dataset],
                                                     getattr(dataset, "labels", None)) for dataset in datasets]


def length_groups(lengths, positions=FORWARD_BATCH_TOKENS):
    """The indices of rows of these lengths, shortest first, in groups of up to `positions` positions (padded to
    the group's longest row, its last): little padding and large products for the passes without a gradient."""
    groups, group = [], []
    for i in np.argsort(lengths, kind="stable"):
        if group and (len(group) + 1) * lengths[i] > positions:
            groups.append(group)
            group = []
        group.append(int(i))
    return groups + [group] if group else groups


def layer_at_a_time(model, batches, start, stop, desc):
    """Batches of hidden states through the decoder layers start to stop - 1, a layer at a time over all of
    them: each layer dequantized once if quantized (models.dequantized_copy), each batch evaluated on its own,
    as a GPU holds every intermediate of what it runs at once."""
    for i in tqdm(range(start, stop), desc=desc, disable=None):
        layer = model.layers[i]
        model.layers[i] = models.dequantized_copy(layer)
        for k, h in enumerate(batches):
            batches[k] = model.run_layers(h, i, i + 1)
            mx.eval(batches[k])
        model.layers[i] = layer
    return batches


def frozen_states(model, layer, rows):
    """The hidden states entering decoder layer `layer` at every input position of these rows, one after the
    other."""
    if not rows:  # a rank of a distributed run with more ranks than examples
        return mx.zeros((0, model.args.hidden_size), model.model[model.args.final_norm].weight.dtype)
    lengths = np.array([len(tokens) - 1 for tokens, _ in rows])
    groups = length_groups(lengths)
    batches = []
    for group in groups:
        inputs = np.zeros((len(group), lengths[group[-1]]), np.int32)
        for k, i in enumerate(group):
            inputs[k, :lengths[i]] = rows[i][0][:-1]
        batches.append(model.embed(mx.array(inputs)))
    batches = layer_at_a_time(model, batches, 0, layer, "Frozen layers")
    pieces = [None] * len(rows)
    for group, h in zip(groups, batches):
        for k, i in enumerate(group):
            pieces[i] = h[k, :lengths[i]]
    states = mx.concatenate(pieces)
    mx.eval(states)
    return states


def release_frozen_weights(model, layer):
    """Free the weights that only the layers below `layer` use (theirs, and the input embedding unless it is
    the output layer too), for which a FrozenPrefix stands in while training; their names, for
    utils.reload_weights. They become empty arrays: anything that still used them would fail, not go wrong."""
    used_by = [f"model.layers.{i}." for i in range(layer)] + ([] if model.args.tie_word_embeddings
                                                              else ["model.embed_tokens."])
    params = dict(tree_flatten(model.parameters()))
    names = [k for k in params if k.startswith(tuple(used_by))]
    model.update(tree_unflatten([(k, mx.zeros((0,), params[k].dtype)) for k in names]))
    del params  # the last references to the weights
    mx.clear_cache()
    return names


@contextlib.contextmanager
def float_copies_on_the_cpu(model):
    """Inside, on the CPU, the quantized layers a training step computes (those from the first trained layer on,
    and the output layer) are float copies, where these take under a tenth of the memory: MLX's CPU dequantizes
    a quantized weight for each product over many rows (models.dequantizes), single-threaded, which a step then
    does twice for every such layer (forward, backward). The same numbers; on the way out the quantized layers
    are back. On a GPU, QLoRA keeps its weights quantized: memory is what it is for."""
    computed = tuple(f"model.layers.{i}." for i in range(first_trained_layer(model), len(model.layers)))

    def where(path):  # (an adapted output layer's base layer too: lm_head.linear, model.embed_tokens.embedding)
        return path.startswith(computed) or (path + ".").startswith(model.output_layers())

    dtype = model.model[model.args.final_norm].weight.dtype
    quantized = [(path, m) for path, m in model.named_modules() if where(path) and hasattr(m, "scales")]
    size = sum(m.scales.size * m.group_size * dtype.size for _, m in quantized)
    if mx.default_device() != mx.cpu or not 0 < size <= memory_size() / 10:
        yield
        return
    models.dequantize(model, dtype, where)
    mx.eval(model.parameters())
    try:
        yield
    finally:
        model.update_modules(tree_unflatten(quantized))


@contextlib.contextmanager
def frozen_layers_cached(model, datasets, config, iterations, source):
    """Inside, the frozen layers below the first trained one are computed once for every example of `datasets`
    (frozen_prefix), the model holds their output (Model.frozen_prefix) and the weights only they use are
    released (release_frozen_weights); it gives the datasets, their rows reading that output. On the way out,
    however it is left but by a stop signal (the script ends), the weights are read back from `source` (the
    model's checkpoint; None leaves them released, for a caller done with the model). Done if
    config.cache_frozen_layers (TrainingArgs) and a run of `iterations` goes through the training set
    (datasets[0]) at least once: a shorter run's pass would compute more than its steps save; else it gives the
    datasets as they are."""
    prefix, examples = None, len(datasets[0]) // config.objective.rows_per_example
    # (a prefix holds hidden states alone: not for a family whose layers read more, Family.layer_at_a_time; nor
    # for the rows of an objective that generates them)
    if (config.cache_frozen_layers and model.args.family.layer_at_a_time and not config.objective.generates
            and iterations * config.batch_size * config.grad_accumulation_steps >= examples):
        prefix, datasets = frozen_prefix(model, datasets)
    if prefix is None:
        yield datasets
        return
    released = release_frozen_weights(model, prefix.layer)
    model.frozen_prefix = prefix
    try:
        yield datasets
    except utils.Stopped:
        source = None
        raise
    finally:
        model.frozen_prefix = None
        if source is not None:
            utils.reload_weights(model, source, released)


# Loss


def token_losses(model, inputs, targets, scored, packing=None):
    """The cross-entropy of each target (0 where it does not count), flat."""
    return state_losses(model, model.hidden_states(inputs, packing=packing), targets, scored)


def state_losses(model, h, targets, scored):
    """The cross-entropy of each target (0 where it does not count) from the final normed hidden states h,
    through float32 logits, flat. The logits (batch x length x vocabulary) never exist whole: chunk_rows(model)
    at a time, each but the last computed again in the backward pass rather than kept (a batch of one chunk
    computes its logits once)."""
    h, targets, scored = h.reshape(-1, h.shape[-1]), targets.reshape(-1), scored.reshape(-1)
    size = chunk_rows(model)

    def chunk_losses(i):  # of the hidden states alone: the targets are not differentiated
        def losses(h):
            logits = model.logits(h).astype(mx.float32)
            picked = mx.take_along_axis(logits, targets[i:i + size, None], axis=-1)[..., 0]
            return (models.logsumexp(logits) - picked) * scored[i:i + size]
        return losses

    return models.in_chunks(chunk_losses, h, size, model)


def chunk_rows(model):
    """The tokens whose logits the loss computes at once (LOSS_LOGITS)."""
    return max(1, LOSS_LOGITS // model.args.vocab_size)


def loss_fn(model, inputs, targets, scored, packing=None):
    """Mean cross-entropy over the targets that count (scored: not padding, not a masked prompt), and their
    count."""
    ntoks = scored.sum()
    return token_losses(model, inputs, targets, scored, packing).sum() / ntoks, ntoks


def sequence_logps(model, sequences: Sequences):
    """Per row of these Sequences: the summed log-probability of its targets that count, and their count."""
    rows, owner, count = sequences
    rows_of = (owner.reshape(-1, 1) == mx.arange(count)).astype(mx.float32)  # positions x rows
    logps = -token_losses(model, *rows) @ rows_of
    return logps, rows.scored.reshape(-1).astype(mx.float32) @ rows_of


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, without the cancellation of either form where it loses digits."""
    return mx.where(x < -math.log(2), mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


def reference_logps(model, rows):
    """A reference's log-probabilities: the model's summed log-probability of each row's scored targets (rows as
    tokenize gives them), float32. Computed as the frozen layers are (layer_at_a_time), as many rows at a
    time as their hidden states fit in a tenth of the memory. In a distributed run each rank computes a share
    of the rows, and all ranks gather all of them."""
    share = rank_share(rows)
    lengths, logps = np.array([len(tokens) - 1 for tokens, *_ in share]), np.zeros(len(share), np.float32)
    for part in length_groups(lengths, memory_size() / 10 / (model.args.hidden_size * 4)):  # states that fit
        groups = [[part[i] for i in group] for group in length_groups(lengths[part])]
        batches = [make_batch([share[i] for i in group], pack=False) for group in groups]
        if model.args.family.layer_at_a_time:
            first = [model.first_states(batch.inputs) for batch in batches]
            states = layer_at_a_time(model, [h for h, _ in first], first[0][1], len(model.layers), "Reference")
        else:  # a batch at a time: the layers read more than the hidden states between them
            states = [model.hidden(model.run_layers(*model.first_states(batch.inputs), len(model.layers)))
                      for batch in batches]
            mx.eval(states)
        for group, batch, h in zip(groups, batches, states):
            rows_at_once = max(chunk_rows(model) // h.shape[1], 1)  # one chunk's logits evaluated at a time, not all
            for k in range(0, len(group), rows_at_once):
                part_rows = slice(k, k + rows_at_once)
                losses = state_losses(model, model.normed(h[part_rows]), batch.targets[part_rows],
                                      batch.scored[part_rows])
                logps[group[part_rows]] = -np.array(losses.reshape(-1, h.shape[1]).sum(axis=1))
    return np.array(gathered(mx.array(logps), np.ones(len(rows), int)))


def across_ranks(numbers):
    """These numbers summed over the ranks of a distributed run (None: none)."""
    group = mx.distributed.init()
    return numbers if numbers is None or group.size() == 1 else mx.distributed.all_sum(numbers, group=group)


# Objectives: what --train-mode trains on


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")  # --loss-type
GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo")

# The flags of the objectives (argparse's keywords), each read by those that have it as a field
OBJECTIVE_FLAGS = {
    "beta": {"type": utils.POSITIVE,
             "help": "TRL's beta (default 0.1): DPO's and KTO's (larger keeps the model closer to its reference, "
                     "the model as training starts), ORPO's weight of the odds-ratio term, SimPO's and CPO's "
                     "scale of the rewards; GRPO's weight of the KL divergence from the reference (default 0: "
                     "none, and no reference pass)."},
    "loss_type": {"choices": DPO_LOSSES + GRPO_LOSSES,
                  "help": "DPO's loss of the reward margin m (TRL's loss_type): sigmoid, -log sigmoid(m) (the "
                          "default); ipo, IPO's squared distance of the mean log-ratios' margin from 1 / (2 beta); "
                          "hinge, max(0, 1 - m); robust, sigmoid allowing for --label-smoothing. GRPO's mean of the "
                          "tokens' losses: dapo, over the batch's completion tokens (the default); grpo, over each "
                          "completion's, then the completions; dr_grpo, the batch's sum over (its completions "
                          "times --max-completion-length); bnpo, over each process's batch's tokens."},
    "label_smoothing": {"type": utils.flag_type(float, lambda v: 0 <= v < 0.5, "a number from 0 to below 0.5"),
                        "help": "DPO (--loss-type robust), SimPO, CPO: the probability that a pair's preference is "
                                "flipped, which the loss allows for (TRL's label_smoothing; default 0)."},
    "cpo_alpha": {"type": utils.NON_NEGATIVE,
                  "help": "The weight of the chosen responses' cross-entropy in the loss (CPO: 1; SimPO: 0)."},
    "simpo_gamma": {"type": utils.NON_NEGATIVE,
                    "help": "SimPO: the reward margin, over beta, that the chosen response must win by (0.5)."},
    "desirable_weight": {"type": utils.POSITIVE, "help": "KTO: the weight of the desirable examples' loss (1)."},
    "undesirable_weight": {"type": utils.POSITIVE, "help": "KTO: the weight of the undesirable examples' loss (1)."},
    "reward_functions": {"metavar": "FILE.py:NAME[,NAME...]",
                         "help": "GRPO: the reward functions, Python functions in a file, called as TRL calls them: "
                                 "fn(prompts=, completions=, completion_ids=, **the data's other columns) -> a "
                                 "list of numbers (None: not scored); e.g. rewards.py:exact_answer,sql_format."},
    "reward_weights": {"type": float, "nargs": "+", "metavar": "WEIGHT",
                       "help": "GRPO: the weight of each reward function in the reward (default 1 each)."},
    "num_generations": {"type": utils.flag_type(int, lambda v: v >= 2, "an integer of at least 2"),
                        "help": "GRPO: the completions generated for each prompt, a group (8); --batch-size "
                                "counts completions and must be a multiple of it."},
    "max_completion_length": {"type": utils.POSITIVE_INT,
                              "help": "GRPO: the most tokens a completion has (512); longer ones are cut there."},
    "mask_truncated_completions": {"action": "store_true", "default": None,
                                   "help": "GRPO: leave the completions cut at --max-completion-length out of the "
                                           "loss."},
    "scale_rewards": {"choices": ("group", "batch", "none"),
                      "help": "GRPO: divide each completion's advantage (its reward less its group's mean) by the "
                              "standard deviation of its group's rewards (group, the default), of the batch's "
                              "(batch), or not (none)."},
    "epsilon": {"type": utils.POSITIVE, "help": "GRPO: the ratio to the old policy is clipped at 1 - epsilon (0.2)."},
    "epsilon_high": {"type": utils.POSITIVE, "help": "GRPO: ... and at 1 + epsilon_high (default: --epsilon)."},
    "num_iterations": {"type": utils.POSITIVE_INT,
                       "help": "GRPO: updates on each batch of completions (1), the log-probabilities of the model "
                               "that generated them kept for the ratio."},
}


class Objective:
    """What --train-mode trains on, as one unit: a frozen dataclass whose fields are the flags it reads
    (OBJECTIVE_FLAGS) at their defaults, registered in OBJECTIVES by its mode. It says
    - which records it learns from: the formats of example_format (formats), what else it checks of one (check)
      and keeps (record_keys), and its one-line error for another format (refusal) or none (expected);
    - how a record becomes rows: the examples of it that encode() tokenizes (responses), which of their tokens
      count (trained), an example's rows_per_example rows (rows) and its label, if it reads one (label);
    - what it computes before training for every example of a set (prepare: a reference's log-probabilities),
      which each example's batches carry (given);
    - how rows become a batch (batch), what the whole batch gives its loss, summed over the ranks of a
      distributed run (statistics), and the loss: (the mean loss, the count it is a mean of, the sums over the
      batch of the numbers named in `sums`, the trained tokens first);
    - the metrics those sums give, named as in TRL (metrics, metric_values), and what the log lines and --test
      show of them (summary, test_line).
    An objective that generates its completions (generates: GRPO) reads prompts alone (prompt_rows), and turns
    each batch of them into the batch it trains on (generated), where batches are made.
    """
    formats = ("text", "completion", "chat")
    record_keys = frozenset()
    rows_per_example = 1
    metrics = ()
    sums = ("tokens",)
    shown = ()  # the metrics that the log lines show
    generates = False

    def refusal(self, kind) -> str:
        return f"a {KIND_NAMES[kind]}, but --train-mode {MODES[type(self)]} learns from {self.learns_from}"

    def check(self, record):
        """What is wrong with a record of one of its formats, or None."""
        return None

    def responses(self, record) -> list:
        return [record]

    def rows(self, encoded) -> list:
        """Each example's rows, from the tokens and spans (encode) of each of its responses: those."""
        return encoded

    def label(self, record):
        return None

    def answer(self, record):
        """The example whose completion --generate-eval compares a generated one with (None: none)."""
        return self.responses(record)[0]

    def prepare(self, model, datasets) -> list:
        return [None for _ in datasets]

    def examples_per_batch(self, batch_size) -> int:
        """The examples of a batch of --batch-size (GRPO: prompts)."""
        return batch_size

    def data_steps(self, steps) -> int:
        """The steps' worth of batches that `steps` iterations of training read (GRPO: fewer, reused)."""
        return steps

    def generated(self, model, batches, train, samples=None):
        """The batches the loss reads, from iterate_batches' (train: the training loop's; samples: a file to append
        a few completions to): those."""
        return batches

    def statistics(self, model, batch):
        return None

    def metric_values(self, sums, count) -> dict:
        return dict(zip(self.metrics, (np.asarray(sums[1:]) / count).tolist()))

    def summary(self, metrics, names=None) -> str:
        """`names` (default: those shown) of the metrics, as a log line shows them."""
        return "".join(f", {name} {metrics[name]:.3f}" for name in names or self.shown if name in metrics)

    def warning(self, metrics):
        """What a report of these training metrics warns of (None: nothing)."""
        return None

    def test_line(self, loss, metrics) -> str:
        return self.summary(metrics)


@dataclasses.dataclass(frozen=True)
class SFT(Objective):
    """Supervised fine-tuning: the mean cross-entropy of the examples' tokens (with --mask-prompt, of their
    completions or assistant messages)."""
    expected = ('an example: expected {"text"}, {"prompt", "completion"} or {"messages"} (a list of {"role", '
                '"content"}, content a string)')

    def refusal(self, kind):
        modes = [mode for mode, objective in OBJECTIVES.items() if kind in objective.formats]
        if kind == "prompt":  # more often an example whose completion is missing than one meant for GRPO
            return f"not {self.expected} (a prompt alone is what --train-mode {either(modes)} learns from)"
        return f"a {KIND_NAMES[kind]}; train on it with --train-mode {either(modes)}"

    def responses(self, record):
        return [exchange(record["prompt"], record["completion"], record.get("tools")) if "completion" in record
                else record]

    def trained(self, mask_prompt):
        return "assistant" if mask_prompt else "all"

    def batch(self, rows, given, pack, by_example):
        return make_batch(rows, pack, by_example)

    def loss(self, model, batch, statistics=None):
        loss, ntoks = loss_fn(model, *batch)
        return loss, ntoks, ntoks.astype(mx.float32)[None]

    def test_line(self, loss, metrics):
        ppl = math.exp(loss) if loss < 700 else math.inf  # exp overflows a float beyond
        return f", Test ppl {ppl:.3f}"


class PairBatch(NamedTuple):
    """A batch of preference pairs: the Sequences of their chosen responses' rows then their rejected ones', and
    the reference's log-probabilities of each pair's two responses (pairs x 2; None without a reference)."""
    sequences: Sequences
    reference: mx.array | None


def reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> list:
    """Per pair, the numbers of Pairs.metrics."""
    return [chosen_rewards, rejected_rewards, chosen_rewards > rejected_rewards, chosen_rewards - rejected_rewards,
            chosen_logps, rejected_logps]


class Pairs(Objective):
    """An objective that learns from preference pairs, scored on the responses alone: a pair is its chosen
    response's row, then its rejected one's; the loss and the metrics are means over the pairs (pair_losses)."""
    formats = ("preference",)
    expected = ('a preference pair: expected {"prompt", "chosen", "rejected"}, three strings, or a list of '
                'messages and one assistant message each')
    learns_from = 'preference pairs {"prompt", "chosen", "rejected"}'
    rows_per_example = 2
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
    shown = ("rewards/accuracies", "rewards/margins")

    @property
    def sums(self):
        return ("tokens", *self.metrics)

    def check(self, record):
        if record["chosen"] == record["rejected"]:
            return "the chosen and the rejected response are the same; a pair needs two responses to prefer one of"
        return None

    def responses(self, record):
        return [exchange(record["prompt"], record[k], record.get("tools")) for k in ("chosen", "rejected")]

    def trained(self, mask_prompt):
        return "completion"

    def batch(self, rows, given, pack, by_example):
        return PairBatch(sequences(rows, pack, by_example), None if given is None else mx.array(given))

    def loss(self, model, batch, statistics=None):
        pairs = batch.sequences.count // 2
        logps, counts = sequence_logps(model, batch.sequences)
        losses, metrics = self.pair_losses(logps[:pairs], logps[pairs:], counts[:pairs], counts[pairs:],
                                           batch.reference)
        return losses.mean(), mx.array(pairs), pair_sums(counts, metrics)


def pair_sums(counts, metrics):
    """The sums over a batch of pairs of the rows' trained tokens and of each metric."""
    return mx.stack([counts.sum()] + [mx.stop_gradient(m).astype(mx.float32).sum() for m in metrics])


def reference_pass(model, datasets, rows_per_example, name, what):
    """name's reference (DPO's, KTO's), for each dataset: the log-probabilities that the model as it is, before
    training, gives each example's rows (reference_logps), examples x rows_per_example; what(n) says what they
    are of, for n examples."""
    examples = sum(map(len, datasets)) // rows_per_example
    say(f"Computing {name}'s reference: the log-probabilities of {what(examples)} before training")
    references = [reference_logps(model, rows).reshape(-1, rows_per_example) for rows in datasets]
    broken = sum(int((~np.isfinite(r)).sum()) for r in references)
    if broken:  # each would make its example's loss NaN
        raise UserError(f"{name}'s reference: the model before training gives {broken} of the responses a "
                        f"log-probability that is not finite; its weights are finite, its computation is not")
    return references


@dataclasses.dataclass(frozen=True)
class DPO(Pairs):
    """DPO (TRL's DPOTrainer): the chosen response made more likely than the reference (the model as training
    starts) made it, the rejected one less. A response's reward is beta times how much more likely the model
    makes it than the reference did."""
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    loss_types = DPO_LOSSES

    def __post_init__(self):
        if self.label_smoothing and self.loss_type != "robust":  # TRL's other losses ignore it
            raise UserError(f"--label-smoothing goes with --loss-type robust, not {self.loss_type}")

    def prepare(self, model, datasets):
        return reference_pass(model, datasets, self.rows_per_example, "DPO", lambda n: f"the responses of {n} pairs")

    def pair_losses(self, chosen, rejected, chosen_counts, rejected_counts, reference):
        """The loss of each pair as TRL's DPOTrainer computes its loss_type."""
        chosen_ratios, rejected_ratios = chosen - reference[:, 0], rejected - reference[:, 1]
        margins = self.beta * (chosen_ratios - rejected_ratios)
        if self.loss_type == "ipo":  # beta is IPO's tau; the log-ratios are means over the response's tokens
            losses = (chosen_ratios / chosen_counts - rejected_ratios / rejected_counts - 1 / (2 * self.beta)) ** 2
        elif self.loss_type == "hinge":
            losses = mx.maximum(1 - margins, 0)
        elif self.loss_type == "robust":  # unbiased where a share label_smoothing of the pairs is flipped
            smoothing = self.label_smoothing
            losses = (-(1 - smoothing) * nn.log_sigmoid(margins) + smoothing * nn.log_sigmoid(-margins)) / (
                1 - 2 * smoothing)
        else:
            losses = -nn.log_sigmoid(margins)
        chosen_rewards, rejected_rewards = self.beta * chosen_ratios, self.beta * rejected_ratios
        return losses, reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected)


@dataclasses.dataclass(frozen=True)
class ORPO(Pairs):
    """ORPO (TRL's ORPOTrainer), without a reference: the chosen response's mean cross-entropy minus beta times
    the log-sigmoid of the log odds ratio of chosen over rejected. A response's reward is beta times its mean
    log-probability."""
    beta: float = 0.1
    metrics = Pairs.metrics + ("nll_loss", "log_odds_ratio", "log_odds_chosen")

    def pair_losses(self, chosen, rejected, chosen_counts, rejected_counts, reference):
        chosen, rejected = chosen / chosen_counts, rejected / rejected_counts
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = nn.log_sigmoid(log_odds)
        losses = -chosen - self.beta * ratio  # the chosen response's NLL, and the odds-ratio term
        return losses, reward_metrics(self.beta * chosen, self.beta * rejected, chosen, rejected) + [
            -chosen, ratio, log_odds]


class KTOBatch(NamedTuple):
    """A batch of KTO examples: the Sequences of their completions' rows and of their KL rows, the reference's
    log-probabilities of both (examples x 2), and their labels (1: desirable, 0: not)."""
    completions: Sequences
    kl: Sequences
    reference: mx.array
    labels: mx.array


@dataclasses.dataclass(frozen=True)
class KTO(Objective):
    """KTO (TRL's KTOTrainer), from completions labelled desirable or not: a desirable completion made more
    likely than the reference (the model as training starts) made it, an undesirable one less, each against
    the batch's estimate of the KL divergence from the reference: the mean log-ratio of its KL rows (each
    prompt with another example's completion), at least 0. A completion's reward is beta times its log-ratio
    to the reference."""
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    batch_size: int = 4  # --batch-size: the groups of examples within which the KL rows swap completions
    formats = ("completion",)
    expected = ('an unpaired example: expected {"prompt", "completion", "label"}, two strings or a list of messages '
                'and one assistant message, and true or false')
    learns_from = 'unpaired examples {"prompt", "completion", "label": true or false}'
    record_keys = frozenset({"label"})
    rows_per_example = 2
    metrics = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
    sums = ("tokens", "kl", "desirable", "undesirable", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected")
    shown = ("kl", "rewards/margins")

    def check(self, record):
        if not isinstance(record.get("label"), bool):
            return (f'"label" is {json.dumps(record["label"])}, not true or false' if "label" in record else
                    'no "label": true for a desirable completion, false for an undesirable one')
        completion = record["completion"]
        if (completion if isinstance(completion, str) else completion[0]["content"]) == "":
            return "an empty completion: nothing to learn from"
        return None

    def responses(self, record):
        return [exchange(record["prompt"], record["completion"], record.get("tools"))]

    def trained(self, mask_prompt):
        return "completion"

    def rows(self, encoded):
        """Each example's row, then its KL row: its prompt with the completion of the example before it in its
        group of batch_size consecutive examples (the first, the group's last's), as TRL's KTOTrainer pairs
        them."""
        rows = []
        for first in range(0, len(encoded), self.batch_size):
            group = [response for response, in encoded[first:first + self.batch_size]]
            for (tokens, spans), (other, ((start, end),)) in zip(group, group[-1:] + group[:-1]):
                prompt = tokens[:spans[0][0]]
                rows.append([(tokens, spans), (prompt + other[start:end], [(len(prompt), len(prompt) + end - start)])])
        return rows

    def label(self, record):
        return float(record["label"])

    def answer(self, record):
        return self.responses(record)[0] if record["label"] else None

    def prepare(self, model, datasets):
        references = reference_pass(model, datasets, self.rows_per_example, "KTO",
                                    lambda n: f"the completions of {n} examples and of their KL rows")
        return [np.column_stack([reference, dataset.labels]) if len(dataset) else None  # (no validation set)
                for reference, dataset in zip(references, datasets)]

    def batch(self, rows, given, pack, by_example):
        n = len(rows) // 2
        return KTOBatch(sequences(rows[:n], pack, by_example), sequences(rows[n:], pack, by_example),
                        mx.array(given[:, :2]), mx.array(given[:, 2]))

    def statistics(self, model, batch):
        """The KL rows' summed log-ratio to the reference, and their count (zeros: a rank with none)."""
        if batch is None:
            return mx.zeros(2)
        logps, _ = sequence_logps(model, batch.kl)
        return mx.stack([(logps - batch.reference[:, 1]).sum(), mx.array(batch.kl.count, mx.float32)])

    def loss(self, model, batch, statistics=None):
        logps, counts = sequence_logps(model, batch.completions)
        kl = mx.maximum(statistics[0] / statistics[1], 0)
        ratios = logps - batch.reference[:, 0]
        desirable = batch.labels.astype(mx.bool_)
        losses = mx.where(desirable, self.desirable_weight * (1 - mx.sigmoid(self.beta * (ratios - kl))),
                          self.undesirable_weight * (1 - mx.sigmoid(self.beta * (kl - ratios))))
        rewards, logps = mx.stop_gradient(self.beta * ratios), mx.stop_gradient(logps)
        undesirable = 1 - batch.labels
        sums = mx.stack([counts.sum(), kl * batch.completions.count, batch.labels.sum(), undesirable.sum(),
                         (rewards * batch.labels).sum(), (rewards * undesirable).sum(), (logps * batch.labels).sum(),
                         (logps * undesirable).sum()])
        return losses.mean(), mx.array(batch.completions.count), sums

    def metric_values(self, sums, count):
        """The KL estimate, a mean over the batches; the rewards and log-probabilities, means over the desirable
        or the undesirable examples (TRL's: none for a batch of neither)."""
        _, kl, desirable, undesirable, *totals = sums
        values = {"kl": kl / count}
        if desirable:
            values.update({"rewards/chosen": totals[0] / desirable, "logps/chosen": totals[2] / desirable})
        if undesirable:
            values.update({"rewards/rejected": totals[1] / undesirable, "logps/rejected": totals[3] / undesirable})
        if desirable and undesirable:
            values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
        return values


@dataclasses.dataclass(frozen=True)
class CPO(Pairs):
    """CPO (TRL's CPOTrainer, loss_type "sigmoid"), without a reference: -log sigmoid(beta times the chosen
    response's summed log-probability minus the rejected one's), label_smoothing of it taken as if the pair were
    flipped, plus cpo_alpha times the chosen responses' cross-entropy (a mean over their tokens). A response's
    reward is beta times its log-probability."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    cpo_alpha: float = 1.0
    averaged = False  # the rewards of log-probabilities summed over a response's tokens

    @property
    def metrics(self):  # (TRL's nll_loss is 0 when it is not trained on)
        return Pairs.metrics + (("nll_loss",) if self.cpo_alpha else ())

    def margin(self):
        """What the chosen response's log-probability must exceed the rejected one's by."""
        return 0.0

    def statistics(self, model, batch):
        """The whole batch's chosen responses' tokens and pairs, which the cross-entropy is a mean over (zeros:
        a rank with none)."""
        if batch is None:
            return mx.zeros(2)
        rows, owner, count = batch.sequences
        chosen = rows.scored & (owner < count // 2)
        return mx.stack([chosen.sum(), mx.array(count // 2)]).astype(mx.float32)

    def loss(self, model, batch, statistics=None):
        pairs = batch.sequences.count // 2
        logps, counts = sequence_logps(model, batch.sequences)
        chosen, rejected = logps[:pairs], logps[pairs:]
        if self.averaged:
            chosen, rejected = chosen / counts[:pairs], rejected / counts[pairs:]
        logits = self.beta * (chosen - rejected - self.margin())
        losses = (-(1 - self.label_smoothing) * nn.log_sigmoid(logits)
                  - self.label_smoothing * nn.log_sigmoid(-logits))
        metrics = reward_metrics(self.beta * chosen, self.beta * rejected, chosen, rejected)
        loss = losses.mean()
        if self.cpo_alpha:
            tokens, total = statistics
            # per pair, its chosen response's part of the whole batch's mean cross-entropy, times the pairs
            nll = -logps[:pairs] * total / tokens
            loss, metrics = loss + self.cpo_alpha * nll.mean(), metrics + [nll]
        return loss, mx.array(pairs), pair_sums(counts, metrics)


@dataclasses.dataclass(frozen=True)
class SimPO(CPO):
    """SimPO (TRL's CPOTrainer, loss_type "simpo"), without a reference: CPO's loss on the responses' mean
    log-probabilities, the chosen one's to exceed the rejected one's by simpo_gamma / beta; without CPO's
    cross-entropy unless cpo_alpha is given (CPO-SimPO)."""
    cpo_alpha: float = 0.0
    simpo_gamma: float = 0.5
    averaged = True

    def margin(self):
        return self.simpo_gamma / self.beta


def completion_logps(model, rows: Batch, temperature):
    """Per position of the rows, flat: the log-probability of its target under the model's logits over the
    temperature (as TRL scores completions sampled at that temperature), and the entropy there (no gradient).
    The logits never exist whole: chunk_rows(model) at a time, as in state_losses."""
    h = model.hidden_states(rows.inputs, packing=rows.packing)
    h, targets, size = h.reshape(-1, h.shape[-1]), rows.targets.reshape(-1), chunk_rows(model)

    def chunk(i):
        def logps_and_entropies(h):
            logits = model.logits(h).astype(mx.float32) / temperature
            normalizer = models.logsumexp(logits)
            picked = mx.take_along_axis(logits, targets[i:i + size, None], axis=-1)[..., 0]
            probabilities = mx.exp(logits - normalizer[:, None])
            return picked - normalizer, mx.stop_gradient(normalizer - (probabilities * logits).sum(axis=-1))
        return logps_and_entropies

    return models.in_chunks(chunk, h, size, model)


def reward_functions(spec):
    """The functions that --reward-functions names, "FILE.py:NAME[,NAME...]": the file run as a module (a
    relative path not found here is looked for beside lora.py, where rewards.py is)."""
    file, colon, names = spec.rpartition(":")
    if not colon or not file or not names.strip(","):
        raise UserError(f"--reward-functions {spec}: expected FILE.py:NAME[,NAME...]")
    path = Path(utils.expanded_path(file))
    if not path.is_file() and not path.is_absolute():
        path = Path(__file__).parent / path
    if not path.is_file():
        raise UserError(f"--reward-functions {spec}: no such file {file}")
    source, module = utils.read_text(path), types.ModuleType(path.stem)
    module.__file__ = str(path)
    try:  # run as import would, but without writing its bytecode beside it
        exec(compile(source, str(path), "exec"), module.__dict__)
    except Exception as e:
        raise UserError(f"--reward-functions {spec}: {file} fails to load ({type(e).__name__}: "
                        f"{utils.first_line(e)})") from None
    functions = []
    for name in filter(None, names.split(",")):
        if not callable(getattr(module, name, None)):
            raise UserError(f"--reward-functions {spec}: {file} has no function {name}")
        functions.append(getattr(module, name))
    return functions


def nanstd(x, axis=None):
    """TRL's nanstd: the standard deviation of the numbers that are not NaN, with Bessel's correction (NaN for
    fewer than two)."""
    with warnings.catch_warnings():  # (a group of one number, or none)
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(x, axis=axis, ddof=1)


def group_advantages(table, weights, generations, scale):
    """TRL's GRPOTrainer's advantages (its sum_then_normalize) of completions in groups of `generations`, each
    prompt's, from their rewards (table: completions x reward functions, NaN where one did not score): the
    weighted reward less its group's mean, over the standard deviation of its group's rewards or the batch's
    (scale: group, batch or none), 0 where no function scored it; and the completions' weighted rewards, and
    which groups' rewards have no spread."""
    table = np.asarray(table, np.float32)
    unscored = np.isnan(table).all(axis=1)
    rewards = np.nansum(table * np.asarray(weights, np.float32), axis=1)
    rewards[unscored] = np.nan
    grouped = rewards.reshape(-1, generations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.repeat(np.nanmean(grouped, axis=1), generations)
    std = np.full_like(rewards, nanstd(rewards)) if scale == "batch" else np.repeat(nanstd(grouped, 1), generations)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return np.nan_to_num(advantages, nan=0.0), rewards, np.isclose(std, 0)


class PromptBatch(NamedTuple):
    """A batch of prompts that GRPO generates from (GRPO.generated): their tokens, their records, and how the
    batch of their completions is laid out (make_batch)."""
    prompts: list
    records: list
    pack: bool
    by_example: object


class GRPOBatch(NamedTuple):
    """A batch of GRPO's completions: the Sequences of their rows (prompt and completion, the completion scored),
    each completion's advantage, the log-probabilities of its tokens (per position of the rows, flat) by the
    model that generated it (None: the model trained on them, once) and by the reference (None: beta 0), and
    this rank's share of the numbers of the generation (GRPO.generation_metrics)."""
    sequences: Sequences
    advantages: mx.array
    old: mx.array | None
    reference: mx.array | None
    numbers: mx.array


@dataclasses.dataclass(frozen=True)
class GRPO(Objective):
    """GRPO (TRL's GRPOTrainer): from each prompt, num_generations completions sampled from the model being
    trained, a group, each scored by the reward functions; a completion's advantage is its reward less its
    group's mean (scaled, scale_rewards), and the loss makes each of its tokens more likely in proportion, the
    ratio to the model that generated it clipped to [1 - epsilon, 1 + epsilon_high], plus beta times an estimate
    of the KL divergence from the reference (the model as training starts), per token, averaged as loss_type
    says. --batch-size counts completions, as TRL's."""
    reward_functions: str | None = None
    reward_weights: list | None = None
    num_generations: int = 8
    max_completion_length: int = 512
    mask_truncated_completions: bool = False
    scale_rewards: str = "group"
    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 1
    temp: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    batch_size: int = 8
    grad_accumulation_steps: int = 1
    formats = ("prompt",)
    expected = 'a prompt: expected {"prompt", other columns}, a string or a list of messages'
    learns_from = 'prompts {"prompt", other columns for the reward functions}'
    loss_types = GRPO_LOSSES
    generates = True
    shown = ("reward", "reward_std", "frac_reward_zero_std", "kl")

    def __post_init__(self):
        if self.reward_functions is None:
            raise UserError("--train-mode grpo needs --reward-functions FILE.py:NAME[,NAME...] (e.g. "
                            "rewards.py:exact_answer)")
        functions = reward_functions(self.reward_functions)
        if self.reward_weights is not None and len(self.reward_weights) != len(functions):
            raise UserError(f"--reward-weights: {len(self.reward_weights)} weights for the {len(functions)} "
                            f"--reward-functions")
        if self.batch_size % self.num_generations:
            raise UserError(f"--batch-size {self.batch_size}: must be a multiple of --num-generations "
                            f"{self.num_generations} (it counts completions, as TRL's)")
        object.__setattr__(self, "functions", functions)  # (a frozen dataclass's attribute, not a flag)

    def test_line(self, loss, metrics):
        """Reported once: each reward function's mean and the completions' lengths beside the usual."""
        means = [f"rewards/{function.__name__}/mean" for function in self.functions]
        return self.summary(metrics, (*self.shown, *means, "completions/mean_length", "completions/clipped_ratio"))

    @property
    def generation_metrics(self):
        """The metrics of a batch's generation, which its every rank knows."""
        names = [f"rewards/{function.__name__}/{kind}" for function in self.functions for kind in ("mean", "std")]
        return ("reward", "reward_std", *names, "frac_reward_zero_std", "completions/mean_length",
                "completions/clipped_ratio", "seconds/generation", "seconds/reward", "seconds/reference")

    @property
    def sums(self):
        return ("tokens", "kl", "entropy", "clip_ratio/region_mean", "batches", *self.generation_metrics)

    @property
    def metrics(self):
        return ("entropy", "clip_ratio/region_mean", *(("kl",) if self.beta else ()), *self.generation_metrics)

    def check(self, record):
        if record["prompt"] == "":
            return "an empty prompt: nothing to generate from"
        return None

    def answer(self, record):
        return None

    def prompt_rows(self, examples, tokenizer, max_length, name):
        """The Rows of the examples' prompts, (tokens, 0), a chat's rendered with the generation prompt, each
        example's record its label; the tokenizer kept, to decode the completions. A prompt that leaves less
        than --max-completion-length tokens of --max-seq-length is an error naming it."""
        where = getattr(examples, "where", lambda i: f"the {name} set's example {i + 1}")
        object.__setattr__(self, "tokenizer", tokenizer)
        rows = []
        for i, record in enumerate(examples):
            prompt = record["prompt"]
            try:
                if isinstance(prompt, str):
                    tokens = tokenizer.encode(prompt)
                else:
                    with utils.bounded(*TEMPLATE_LIMITS):
                        text = tokenizer.apply_chat_template(prompt, tools=record.get("tools"), tokenize=False,
                                                             add_generation_prompt=True)
                    tokens = tokenizer.encode(text, add_special_tokens=False)
            except UserError as e:
                raise UserError(f"{where(i)}: {e}") from None
            except Exception as e:  # a chat template raises what its Jinja code raises
                what = "cannot be tokenized" if isinstance(prompt, str) else \
                    f"the chat template of {tokenizer.name_or_path} fails on it"
                raise UserError(f"{where(i)}: {what} ({type(e).__name__}: {utils.first_line(e)})") from None
            if len(tokens) + self.max_completion_length > max_length:
                raise UserError(f"{where(i)}: its prompt is {len(tokens)} tokens, which with --max-completion-length "
                                f"{self.max_completion_length} pass --max-seq-length {max_length}; shorten it, or "
                                f"raise --max-seq-length")
            rows.append((tokens, 0))
        records = np.empty(len(examples), object)
        records[:] = list(examples)
        return Rows(rows, records)

    def prepare(self, model, datasets):
        """Each set's records, which its batches carry; with beta, the trained weights as they are now, before
        training, as the reference (the base with new adapters, or --resume-adapter-file's): no copy of the
        model, and of adapters none but the arrays that training replaces."""
        if self.beta:
            object.__setattr__(self, "reference_weights", tree_flatten(model.trainable_parameters()))
        return [getattr(dataset, "labels", None) for dataset in datasets]

    def batch(self, rows, given, pack, by_example):
        return PromptBatch([tokens for tokens, _ in rows], list(given), pack, by_example)

    def examples_per_batch(self, batch_size):
        return batch_size // self.num_generations

    def data_steps(self, steps):
        """Each batch of prompts is trained on num_iterations times: a run resumed within those goes on with
        the next batch (the completions' old log-probabilities are gone)."""
        return -(-steps // self.num_iterations)

    def generated(self, model, batches, train, samples=None):
        """Each batch of prompts (PromptBatch; None: none of it this rank's) as the GRPOBatch of its completions
        (rollout). In training, the completions of grad_accumulation_steps batches (a step's) are generated at
        once, in one call (TRL's steps_per_generation: the gradient is then taken a batch at a time, so that
        --grad-accumulation-steps bounds the memory of a large group), and trained on num_iterations times."""
        steps = self.num_iterations if train else 1
        while True:
            cycle = list(itertools.islice(batches, self.grad_accumulation_steps if train else 1))
            if not cycle:
                return
            began = time.perf_counter()
            completions = self.completions(model, cycle)
            seconds = (time.perf_counter() - began) / len(cycle)  # each batch's share of the generation
            rolled = [self.rollout(model, batch, made, seconds, steps > 1, samples)
                      for batch, made in zip(cycle, completions)]
            for _ in range(steps):
                yield from rolled

    def completions(self, model, cycle):
        """Each batch's Completions, num_generations of each of its prompts, all generated in one call. Each row
        is sampled with its own seed: the batch's seed (drawn from the random state, which training sets from
        --seed and the iteration) and the row's place in the global batch, so that a completion is the same
        whatever rank makes it and whichever rows are generated beside it."""
        generations, rank, prompts, seeds, sizes = self.num_generations, mx.distributed.init().rank(), [], [], []
        for batch in cycle:
            seed = mx.random.randint(0, 2**31 - 1, ()).item()
            local = 0 if batch is None else len(batch.prompts)
            first = rank_slices(int(across_ranks(mx.array(local)).item()))[rank].start  # its first prompt's place
            rows = [prompt for prompt in (batch.prompts if batch else []) for _ in range(generations)]
            prompts += rows
            seeds += [(seed + first * generations + row) % 2**31 for row in range(len(rows))]
            sizes.append(len(rows))
        made = utils.generate_batch(model, prompts, self.max_completion_length, temp=self.temp, top_p=self.top_p,
                                    top_k=self.top_k, min_p=self.min_p, eos_ids={self.tokenizer.eos_token_id}, stop=(),
                                    tokenizer=self.tokenizer, seed=seeds)
        return [made[end - size:end] for size, end in zip(sizes, itertools.accumulate(sizes))]

    def rollout(self, model, batch, completions, generation_seconds, keeps_old, samples):
        """The GRPOBatch of a batch of prompts and their completions (generated in generation_seconds): their
        rewards, advantages and metrics, computed from every rank's rewards as one process computes them; the
        log-probabilities of the model as it is (keeps_old) and of the reference (beta). samples: a file that
        the first prompt's completions are appended to."""
        generations, local = self.num_generations, 0 if batch is None else len(batch.prompts)
        total = int(across_ranks(mx.array(local)).item())
        first = rank_slices(total)[mx.distributed.init().rank()].start  # this rank's first prompt in the batch
        generated = time.perf_counter()
        texts = [self.tokenizer.decode(completion.tokens, skip_special_tokens=True) for completion in completions]
        table = self.rewards(batch, texts, [list(completion.tokens) for completion in completions])
        truncated = np.array([completion.finish != "eos" for completion in completions], np.float32)
        lengths = np.array([len(completion.tokens) for completion in completions], np.float32)
        rewarded = time.perf_counter()
        everyone = np.array(gathered(mx.array(np.column_stack([table, lengths, truncated]).reshape(-1, len(
            self.functions) + 2)), np.full(total, generations)))  # every rank's completions, in order
        table, lengths, truncated = everyone[:, :-2], everyone[:, -2], everyone[:, -1]
        advantages, rewards, zero_std = group_advantages(table, self.reward_weights or [1.0] * len(self.functions),
                                                         generations, self.scale_rewards)
        mine = slice(first * generations, (first + local) * generations)
        if samples is not None and local:
            with open(samples, "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"prompt": batch.records[0]["prompt"], "completion": text,
                                         "reward": float(reward), "advantage": float(advantage)}) + "\n"
                             for text, reward, advantage in zip(texts[:generations], rewards[mine],
                                                                advantages[mine]))
        if not local:
            return None
        rows = []
        for k, completion in enumerate(completions):
            prompt = batch.prompts[k // generations]
            tokens = prompt + list(completion.tokens)
            masked = self.mask_truncated_completions and completion.finish != "eos"
            rows.append((tokens, np.zeros(len(tokens) - 1, bool) if masked else len(prompt) - 1))
        completions = sequences(rows, batch.pack, batch.by_example)
        old = reference = None
        if keeps_old:
            old, _ = completion_logps(model, completions.rows, self.temp)
        if self.beta:
            trained = tree_flatten(model.trainable_parameters())
            model.update(tree_unflatten(self.reference_weights))
            reference, _ = completion_logps(model, completions.rows, self.temp)
            model.update(tree_unflatten(trained))
        mx.eval([logps for logps in (old, reference) if logps is not None])
        with warnings.catch_warnings():  # (a function that scored none)
            warnings.simplefilter("ignore", RuntimeWarning)
            numbers = [np.nanmean(rewards), nanstd(rewards)]
            numbers += [value for column in table.T for value in (np.nanmean(column), nanstd(column))]
        numbers += [zero_std.mean(), lengths.mean(), truncated.mean(), generation_seconds, rewarded - generated,
                    time.perf_counter() - rewarded]
        share = 1 / mx.distributed.init().size()  # the ranks' shares add up to the batch's numbers
        return GRPOBatch(completions, mx.array(advantages[mine]), old, reference,
                         mx.array(np.array([1.0, *numbers], np.float32) * share))

    def rewards(self, batch, completions, completion_ids):
        """Each reward function's rewards for the completions (texts; a chat prompt's as one assistant message),
        called as TRL calls it: completions x functions, NaN where it gave None. What it raises, or a reward
        that is neither None nor a finite number, or a list of another length is an error naming it."""
        generations = self.num_generations
        records = [record for record in (batch.records if batch else []) for _ in range(generations)]
        prompts = [record["prompt"] for record in records]
        if prompts and not isinstance(prompts[0], str):
            completions = [[{"role": "assistant", "content": text}] for text in completions]
        columns = {key: [record.get(key) for record in records] for key in (records[0] if records else ())
                   if key != "prompt"}
        table = np.full((len(completions), len(self.functions)), np.nan, np.float32)
        for j, function in enumerate(self.functions if completions else ()):
            culprit = f"--reward-functions: {function.__name__}"
            try:
                values = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            except Exception as e:
                raise UserError(f"{culprit} raised {type(e).__name__}: {utils.first_line(e)}") from None
            if not isinstance(values, (list, tuple, np.ndarray)) or len(values) != len(completions):
                got = f"{len(values)} rewards" if isinstance(values, (list, tuple, np.ndarray)) else repr(values)[:60]
                raise UserError(f"{culprit} returned {got} for {len(completions)} completions; it must return a "
                                f"list of one reward for each")
            for i, value in enumerate(values):
                if value is None:
                    continue
                if not isinstance(value, numbers.Real) or not math.isfinite(value):
                    raise UserError(f"{culprit} returned {repr(value)[:60]} for completion {i + 1}: a reward is a "
                                    f"finite number, or None for a completion it does not score")
                table[i, j] = value
        return table

    def loss(self, model, batch, statistics=None):
        """The loss as TRL's GRPOTrainer computes its loss_type, the count it is a mean of (dapo: the tokens; grpo,
        dr_grpo: the completions; bnpo: the batch), and the sums of the metrics (kl, entropy and clipped tokens)
        and of the generation's numbers."""
        rows, owner, count = batch.sequences
        logps, entropies = completion_logps(model, rows, self.temp)
        scored, owner = rows.scored.reshape(-1).astype(mx.float32), owner.reshape(-1)
        advantages = batch.advantages[owner]
        ratio = mx.exp(logps - (mx.stop_gradient(logps) if batch.old is None else batch.old))
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        losses = -mx.minimum(ratio * advantages, mx.clip(ratio, 1 - self.epsilon, 1 + high) * advantages)
        kl = mx.zeros_like(logps)
        if self.beta:  # times the ratio (TRL's use_bias_correction_kl): the gradient of the reverse KL, unbiased
            log_ratio = batch.reference - logps
            kl = (mx.exp(log_ratio) - log_ratio - 1) * ratio
            losses = losses + self.beta * kl
        tokens, total = scored.sum(), (losses * scored).sum()
        if self.loss_type == "grpo":  # each completion's mean, then their mean
            rows_of = (owner[:, None] == mx.arange(count)).astype(mx.float32)
            loss, n = ((losses * scored) @ rows_of / mx.maximum(scored @ rows_of, 1)).mean(), mx.array(count)
        elif self.loss_type == "dr_grpo":
            loss, n = total / (count * self.max_completion_length), mx.array(count)
        elif self.loss_type == "bnpo":  # this rank's batch's tokens
            loss, n = total / mx.maximum(tokens, 1), mx.array(1)
        else:  # dapo: weighed by its tokens, the whole batch's
            n = mx.maximum(tokens, 1)
            loss = total / n
        clipped = (ratio < 1 - self.epsilon) & (advantages < 0) | (ratio > 1 + high) & (advantages > 0)
        sums = mx.stack([tokens, (kl * scored).sum(), (entropies * scored).sum(), (clipped * scored).sum()])
        return loss, n, mx.concatenate([mx.stop_gradient(sums), batch.numbers])

    def metric_values(self, sums, count):
        """The means over the completions' tokens (TRL's global_masked_mean), and the generations' numbers, means
        over the batches."""
        tokens, kl, entropy, clipped, batches, *numbers = sums
        tokens = max(tokens, 1)
        values = {"entropy": entropy / tokens, "clip_ratio/region_mean": clipped / tokens}
        if self.beta:
            values["kl"] = kl / tokens
        return {**values, **dict(zip(self.generation_metrics, (np.asarray(numbers) / batches).tolist()))}

    def warning(self, metrics):
        if metrics["frac_reward_zero_std"] > 1 - 1e-6:  # (a sum of the ranks' shares)
            return ("every group's completions since the last report got the same reward: their advantages are 0, "
                    "and nothing is learnt from them; give reward functions that tell a prompt's completions "
                    "apart, or more --num-generations, or a higher --temp")
        return None


# by --train-mode
OBJECTIVES = {"sft": SFT, "dpo": DPO, "orpo": ORPO, "kto": KTO, "simpo": SimPO, "cpo": CPO, "grpo": GRPO}
MODES = {objective: mode for mode, objective in OBJECTIVES.items()}


def objective_flags(objective) -> set:
    """The flags an objective (its class) reads: its fields."""
    return {field.name for field in dataclasses.fields(objective)}


def objective_of(flags: dict) -> Objective:
    """The objective of --train-mode, with the flags it reads (those not given at its defaults)."""
    kind = OBJECTIVES[flags["train_mode"]]
    return kind(**{name: flags[name] for name in objective_flags(kind) if flags.get(name) is not None})


# Step


def learning_rate_schedule(config):
    """The learning rate at each update: a linear warmup from 0, then constant or decaying to 0 at --iters."""
    rate, warmup = config.learning_rate, min(config.warmup, config.iters)
    decay = max(config.iters - warmup, 1)
    schedule = {"constant": lambda step: mx.array(rate, mx.float32),
                "linear": optim.linear_schedule(rate, 0.0, decay),
                "cosine": optim.cosine_decay(rate, decay, 0.0)}[config.lr_schedule]
    return optim.join_schedules([optim.linear_schedule(0.0, rate, warmup), schedule], [warmup]) if warmup else schedule


# --optimizer's choices, MLX's optimizers made from the learning-rate schedule and --weight-decay
OPTIMIZERS = {
    "adam": lambda schedule, weight_decay: optim.Adam(schedule),
    "adamw": optim.AdamW,
    # the schedule's step size, as Hugging Face advises for fine-tuning, not scaled by the weight's size: a LoRA B
    # starts at 0, which would make its steps 1e-3 times smaller
    "adafactor": lambda schedule, weight_decay: optim.Adafactor(schedule, weight_decay=weight_decay,
                                                                relative_step=False, scale_parameter=False),
    "sgd": optim.SGD,
    "muon": optim.Muon,
    "lion": optim.Lion,
}


def build_optimizer(config):
    optimizer = OPTIMIZERS[config.optimizer](learning_rate_schedule(config), weight_decay=config.weight_decay)
    return lora_plus(optimizer, config.lora_plus_ratio) if config.lora_plus_ratio else optimizer


def lora_plus(optimizer, ratio: float):
    """LoRA+ (Hayou et al. 2024) as PEFT's create_loraplus_optimizer makes it: the arrays that
    models.AdapterKind.lora_plus names (lora_b, DoRA's m) learn at `ratio` times the learning rate. The step of
    every optimizer of OPTIMIZERS (weight decay included; Adafactor's as built there) is the learning rate times
    the rest, so theirs is the optimizer's times `ratio`, and its state is the optimizer's own (checkpoints resume
    alike)."""
    faster = {name for kind in models.ADAPTER_KINDS.values() for name in kind.lora_plus}
    apply_gradients = optimizer.apply_gradients

    def apply_with_ratio(gradients, parameters):
        updated = apply_gradients(gradients, parameters)
        return tree_map_with_path(lambda path, new, old: old + ratio * (new - old)
                                  if path.rsplit(".", 1)[-1] in faster else new, updated, parameters)

    optimizer.apply_gradients = apply_with_ratio
    return optimizer


def make_step(model, optimizer, config, compiled=None):
    """step(batches, stop) -> (loss, count, stop, sums), arrays: one update on the mean gradient of
    config.grad_accumulation_steps batches of config.objective (weighted by the count each batch's loss is a
    mean of: tokens, or examples; see Objective), its model and optimizer state being evaluated (mx.async_eval:
    the call returns before the device is done); sums are the objective's, summed over the batches. Compiled
    if config.compile, unless `compiled` says otherwise. In a distributed run the batches are this rank's shares
    of the global ones: the gradient, the loss, the count, the sums and `stop` (a flag any rank may raise) are
    summed over the ranks, so that every rank makes the update one process would make on the global batch."""
    group, objective = mx.distributed.init(), config.objective
    loss_and_grad = nn.value_and_grad(model, objective.loss)
    state = [model.state, optimizer.state, mx.random.state]

    def gradient(batch):
        """Loss and gradient of the batch, both weighted by the count its loss is a mean of; the count; the sums."""
        statistics = across_ranks(objective.statistics(model, batch))
        (loss, count, sums), grads = loss_and_grad(model, batch, statistics)
        return loss * count, count, sums, tree_map(lambda g: g * count, grads)

    def update(grads, count, loss, sums, stop):
        if group.size() == 1:
            grads = tree_map(lambda g: g / count, grads)
        else:  # the gradient in one all-reduce (of 32 MB pieces), the numbers in another
            numbers = mx.concatenate([mx.stack([loss, count.astype(loss.dtype), stop]), sums])
            loss, total, stop, sums = mx.split(mx.distributed.all_sum(numbers, group=group), [1, 2, 3])
            loss, count, stop = loss[0], total[0].astype(count.dtype), stop[0]
            grads = tree_map(lambda g: g * (group.size() / total[0]), nn.average_gradients(grads, group=group))
        if config.max_grad_norm:
            grads, _ = optim.clip_grad_norm(grads, config.max_grad_norm)
        optimizer.update(model, grads)
        return loss / count, count, stop, sums  # no empty array: CUDA's compiled kernels fail on one

    def update_on(stop, batch):
        loss, count, sums, grads = gradient(batch)
        return update(grads, count, loss, sums, stop)

    if config.compile if compiled is None else compiled:
        gradient, update, update_on = (mx.compile(f, inputs=state, outputs=state) for f in (gradient, update, update_on))

    def step(batches, stop=mx.array(0.0)):
        if config.grad_accumulation_steps == 1:  # one compiled function for the whole step
            results = update_on(stop, next(batches))
        else:
            loss, count, sums, grads = gradient(next(batches))
            for _ in range(config.grad_accumulation_steps - 1):
                # each batch's gradient computed before the next batch's: MLX would otherwise compute the
                # batches side by side, and hold all their activations at once
                mx.async_eval(loss, count, sums, grads)
                more = gradient(next(batches))
                loss, count, sums = loss + more[0], count + more[1], sums + more[2]
                grads = tree_map(mx.add, grads, more[3])
            results = update(grads, count, loss, sums, stop)
        mx.async_eval(state, *results)
        return results

    return step


def pipelined(launch, iterations, synced=lambda it: False):
    """(it, latest, values) for each iteration: launch(it) starts a step (make_step) and gives its arrays,
    values are them read as numbers. A step's values are read once the next step is launched, so that the
    device has work queued while the host launches the next (on a GPU, launching a small step takes about as
    long as running it). latest says no later step was launched.
    After a step where synced(it) the next one waits, as evaluating and saving need the model as that step
    left it."""
    def read(launched, latest):
        return launched[0], latest, [a.tolist() for a in launched[1]]

    pending = None
    for it in iterations:
        launched = it, launch(it)
        if pending:
            yield read(pending, False)
        pending = launched
        if synced(it):
            yield read(pending, True)
            pending = None
    if pending:
        yield read(pending, True)


# Training


def set_up_training(model, args, scale):
    """Make the model's trainable part (adapters or, with --fine-tune-type full, whole layers); the
    adapter_config.json that describes it."""
    kind, params = args.fine_tune_type, {"rank": args.lora_rank, "scale": scale, "dropout": args.lora_dropout}
    rslora = args.use_rslora
    if args.resume_adapter_file:
        print(f"Resuming from {args.resume_adapter_file}", flush=True)
        with utils.naming_flag("--resume-adapter-file"):
            adapters = utils.read_adapters(args.resume_adapter_file, scale)
            utils.apply_adapters(model, adapters, args.resume_adapter_file, args.lora_dropout, base=args.model)
        kind = adapters.fine_tune_type
        params = {**adapters.config.get("lora_parameters", {}), "dropout": args.lora_dropout}
        rslora = params.get("use_rslora", False)
    else:
        with utils.naming_flag(f"--lora-layers {args.lora_layers}"):
            trained = models.last_layers(model, args.lora_layers)
        if kind == "full":
            if any(isinstance(m, nn.QuantizedLinear) for layer in trained for _, m in layer.named_modules()):
                raise UserError("--fine-tune-type full: the model is quantized; train LoRA or DoRA adapters on it "
                                "(QLoRA), or convert it without -q")
            for layer in trained:
                layer.unfreeze()
        else:
            with utils.naming_flag("--lora-targets"):
                paths = models.target_paths(model, args.lora_targets or models.default_lora_targets(model),
                                            args.lora_layers)
            check_lora_rank(model, paths, args.lora_rank)
            with utils.naming_flag(f"--fine-tune-type {kind}"):
                models.wrap_lora_layers(model, paths, **params, kind=kind)
            with utils.naming_flag(f"--init-lora-weights {args.init_lora_weights}"):
                models.initialise_adapters(models.lora_layers(model), args.init_lora_weights)
            if args.init_lora_weights.startswith(("pissa", "olora")):  # saved as adapters of the original weights
                params["rank"] *= 2
    layers = {name.split(".")[2] for name, _ in tree_flatten(model.trainable_parameters())
              if name.startswith("model.layers.")}
    # the base as a path from anywhere (check_base_model), or the hub repo id
    base = str(Path(args.model).absolute()) if Path(args.model).exists() else args.model
    config = {"base_model": base, "base_model_config": utils.base_model_config(model), "fine_tune_type": kind,
              "num_layers": len(layers)}
    if kind == "full":
        return config
    adapted = models.per_expert(model, dict(tree_flatten(model.trainable_parameters())))  # each expert's apart
    # a decoder layer's by its path inside the layer, the embedding's and output layer's by PEFT's names
    keys = sorted({name.split(".", 3)[3].rsplit(".", 1)[0] if name.startswith("model.layers.") else
                   name.rsplit(".", 1)[0].removeprefix("model.") for name in adapted})
    return {**config, "lora_parameters": {"rank": params["rank"], "scale": params["scale"],
                                          "dropout": params["dropout"], **({"use_rslora": True} if rslora else {}),
                                          "keys": keys}}


def check_lora_rank(model, paths, rank):
    """A rank above both a layer's input and output features makes each of its adapter's matrices larger than
    the layer itself, and a huge one arrays that MLX cannot make (a segfault): refused, naming the layer."""
    modules = dict(model.named_modules())
    for path in paths:
        layer = models.adaptable_layer(modules, path)
        outputs, inputs = models.features(layer)
        if rank > max(inputs, outputs):
            raise UserError(f"--lora-rank {rank}: more than both the {inputs} inputs and the {outputs} outputs of "
                            f"{path}")


def train(model, train_set, valid_set, config, adapter_file, adapter_config):
    """Train as config (TrainingArgs) says, saving the adapters and checkpoints, logging to metrics.jsonl. A stop
    signal (Ctrl-C, SIGTERM, SIGHUP) in the loop stops it after the step under way (during validation, at once),
    saving a checkpoint; a second stops it at once; either raises utils.Stopped saying what was kept. In a
    distributed run, rank 0 alone writes. Returns the seconds that each part of training took."""
    group, objective = mx.distributed.init(), config.objective
    writer, single = group.rank() == 0, group.size() == 1
    optimizer = build_optimizer(config)
    resumed = checkpoint_arrays(config.resume, model, optimizer) if config.resume else None
    # the best validation loss so far, its iteration and the validations since that were not better by the
    # threshold (TRL's names), which checkpoints keep; the best adapters are saved beside the last
    best = resumed[3] if resumed else {"best_metric": None, "best_global_step": None,
                                       "early_stopping_patience_counter": 0}
    best_file = best_adapter_file(adapter_file)
    first = resumed[0] + 1 if resumed else 1
    folder = new_run_folder(adapter_file.parent / "runs") if writer else None
    say(f"Run {folder}: its checkpoints, metrics.jsonl and loss.png"
        + (f"; resuming from {config.resume} at iteration {first}" if config.resume else ""))
    evaluations = config.iters // config.steps_per_eval - (first - 1) // config.steps_per_eval
    if valid_set and not (config.eval_on_start and first == 1 or evaluations):
        # no validation in this run: the first batch alone is used, the probe before a save (check_before_saving)
        valid_set = valid_set.head(objective.examples_per_batch(config.batch_size), objective.rows_per_example)
    seconds, entered = Counter(), time.perf_counter()
    copies = float_copies_on_the_cpu(model)
    with copies, frozen_layers_cached(model, [train_set, valid_set], config, config.iters - first + 1,
                                      config.reload_from) as (train_set, valid_set):
        seconds["frozen-layer pass"] = time.perf_counter() - entered
        with timed(seconds, "reference pass"):  # of the model before training
            given = prepared(model, objective, train_set, valid_set, config)
        if resumed:
            model.load_weights(list(resumed[1].items()), strict=False)
            optimizer.state = tree_unflatten(list(resumed[2].items()))
        step = make_step(model, optimizer, config)
        metrics_path, saved = folder and folder / "metrics.jsonl", []
        log = metrics_log(metrics_path, resumed_metrics(config, first - 1) if writer else [], config)
        batches = iterate_batches(train_set, objective.examples_per_batch(config.batch_size), train=True,
                                  seed=config.seed, pack=config.pack, sort=config.sort_by_length,
                                  start=objective.data_steps(first - 1) * config.grad_accumulation_steps,
                                  objective=objective, given=given[0], by_example=model.args.packs_by_example or None)
        batches = objective.generated(model, batches, True, folder and folder / "completions.jsonl")
        # stopping: a stop signal on some rank (the steps' summed flag); stopped: the utils.Stopped training ends with
        stopping, checkpoint, stopped, announced = [], None, None, False
        validated = None  # the iteration of the last validation loss
        window, total_tokens = [], 0  # the (loss, count, sums) of the steps since the last report

        def training_time():  # validation left out of the training speed and the time left
            return time.perf_counter() - seconds["validation"]

        began = tic = training_time()
        bar = tqdm(range(first, config.iters + 1), initial=first - 1, total=config.iters,
                   disable=None if writer else True, unit="it", dynamic_ncols=True)

        def launch(it):
            mx.random.seed((config.seed << 32) + it)  # dropout's masks: a function of the seed and the iteration
            return (*step(batches, mx.array(float(bool(interrupted)))), optimizer.learning_rate)

        def reports(it):
            return it % config.steps_per_report == 0 or it == config.iters

        def evaluates(it):  # after the update, as the reference does: iteration 1 has taken one step
            return config.val_batches != 0 and (it == 1 and config.eval_on_start or it % config.steps_per_eval == 0)

        def saves(it):
            return it % config.save_every == 0 or it == config.iters

        def stops():  # at the step read: every rank at the same, one process at once
            return bool(stopping) or single and bool(interrupted)

        def take(it, loss, count, stop, sums):
            """A step's numbers, read: a stop flag raised on some rank noted, a loss that is not finite stopping
            training, the rest kept for the next report."""
            nonlocal announced
            stopping.extend([True] if stop else [])
            if interrupted and not announced:
                say(f"{utils.STOP_SIGNALS[interrupted[0]]}: stopping after the step under way, to save it; a "
                    f"second signal stops at once")
                announced = True
            if it == first:  # the first step's time is mostly compiling it
                seconds["first step"] = training_time() - began
            if not math.isfinite(loss):
                diverged(it, f"the loss is {loss}" + (" before any update" if it == first else ""),
                         adapter_file, checkpoint, lowering_helps=it > first, best=best_kept())
            window.append((loss, count, sums))

        def report(it, learning_rate):
            """The steps since the last report: their mean loss, speed and metrics, logged."""
            nonlocal window, total_tokens, tic
            losses, counts, sums = zip(*window)
            sums, elapsed = np.sum(sums, axis=0), training_time() - tic
            tokens = int(sums[0])
            total_tokens += tokens
            record = {"iteration": it, "train_loss": float(np.mean(losses)), "learning_rate": learning_rate,
                      "iterations_per_second": len(losses) / elapsed, "tokens_per_second": tokens / elapsed,
                      "trained_tokens": total_tokens, "peak_memory_gb": peak_memory(group) / 1e9,
                      **objective.metric_values(sums, sum(counts))}
            log(record)
            left = eta_seconds(training_time() - began, seconds["first step"], it - first, config.iters - it)
            say(f"Iter {it}: Train loss {record['train_loss']:.3f}{objective.summary(record)}, "
                f"It/sec {record['iterations_per_second']:.3f}, Tokens/sec {record['tokens_per_second']:.1f}, "
                f"Trained tokens {total_tokens}, Learning rate {record['learning_rate']:.2e}, "
                f"Peak mem {record['peak_memory_gb']:.2f} GB, ETA {left:.0f}s")
            if objective.warning(record):
                say(f"[WARNING] {objective.warning(record)}")
            bar.set_postfix_str(f"loss {record['train_loss']:.3f}, {record['tokens_per_second']:.0f} tok/s, "
                                f"peak {record['peak_memory_gb']:.2f} GB", refresh=False)
            window, tic = [], training_time()

        def validate(it):
            """The validation loss and metrics, logged; a loss that is not finite stops training. One process: a
            stop signal ends validation at once, and training at this step."""
            nonlocal validated
            model.eval()
            before = seconds["validation"]
            try:
                with timed(seconds, "validation"), utils.stops_at_once() if single else contextlib.nullcontext():
                    val_loss, val_metrics = evaluate(model, valid_set, config.batch_size, config.val_batches,
                                                     objective, given[1])
            except utils.Stopped as e:
                if not single:  # a second signal
                    raise
                interrupted.append(e.signum)
            else:
                if not math.isfinite(val_loss):
                    diverged(it, f"the validation loss is {val_loss}", adapter_file, checkpoint, best=best_kept())
                validated, val_time = it, seconds["validation"] - before
                log({"iteration": it, "val_loss": val_loss, **{f"val_{k}": v for k, v in val_metrics.items()},
                     "val_time": val_time})
                say(f"Iter {it}: Val loss {val_loss:.3f}{objective.summary(val_metrics)}, Val took {val_time:.3f}s")
                keep_if_best(it, val_loss)
            model.train()

        def check_before_saving(it):
            """Stop rather than save adapters that are not finite, or that give a loss that is not (the update
            after a finite loss can overflow): a save never replaces good adapters by broken ones. Their loss is
            the validation loss of this iteration, else that of the first validation (or training) batch."""
            if utils.first_not_finite(dict(tree_flatten(model.trainable_parameters()))) is not None:
                diverged(it, "the adapter weights are not finite", adapter_file, checkpoint, best=best_kept())
            if validated == it:
                return
            probe, probe_given = (valid_set, given[1]) if len(valid_set) else (train_set, given[0])
            # an objective that generates probes with its prompts' own loss: adapters that overflow show there
            # too, and generating a batch's completions can take longer than the run's steps
            probe_objective = SFT() if objective.generates else objective
            model.eval()
            probe_loss, _ = evaluate(model, probe, config.batch_size, 1, probe_objective, probe_given)
            model.train()
            if not math.isfinite(probe_loss):
                diverged(it, f"the adapters give a loss of {probe_loss} on the first "
                             f"{'validation' if probe is valid_set else 'training'} batch", adapter_file, checkpoint,
                         best=best_kept())

        def keep_if_best(it, val_loss):
            """A validation loss below the best so far: the adapters saved as the best. Not below it by the
            threshold: one more validation towards the patience."""
            previous = math.inf if best["best_metric"] is None else best["best_metric"]
            better = val_loss < previous - (config.early_stopping_threshold or 0.0)
            best["early_stopping_patience_counter"] = 0 if better else best["early_stopping_patience_counter"] + 1
            if val_loss >= previous:
                return
            best.update(best_metric=val_loss, best_global_step=it)
            with timed(seconds, "saving"):
                if writer:
                    utils.save_adapters(best_file, model, adapter_config)
                    utils.write_folder(folder / "best", lambda tmp: utils.save_adapters(
                        tmp / "adapters.safetensors", model, adapter_config))
                mx.eval(across_ranks(mx.array(0.0)))  # as save() does

        def best_kept():
            """Where the best adapters are, as a sentence of the error that ends training ("": none yet)."""
            if best["best_global_step"] is None or not best_file.exists():
                return ""
            return (f" The best adapters, of iteration {best['best_global_step']} (validation loss "
                    f"{best['best_metric']:.3f}), are in {best_file}.")

        def plateaued():
            return bool(config.early_stopping_patience) and (
                best["early_stopping_patience_counter"] >= config.early_stopping_patience)

        def save(it):
            """The adapters and a checkpoint, once checked (check_before_saving); rank 0 writes them."""
            nonlocal checkpoint
            with timed(seconds, "saving"):
                check_before_saving(it)
                if writer:
                    utils.save_adapters(adapter_file, model, adapter_config)
                    checkpoint = save_checkpoint(folder, it, model, optimizer, adapter_config, config, saved, best)
                # every rank waits for rank 0's files: a rank that stopped and left first would have the
                # launcher end rank 0 mid-write
                mx.eval(across_ranks(mx.array(0.0)))
            say(f"Iter {it}: Saved adapter weights to {adapter_file} and checkpoint {checkpoint}.")

        interrupted = utils.hold_stops()  # a stop signal here
        try:
            # every rank stops at the same step: the first read whose flag shows an interruption, or, if a later
            # step was launched already, that one; one process at the step under way
            for it, latest, (loss, count, stop, sums, learning_rate) in pipelined(
                    launch, bar, lambda it: evaluates(it) or saves(it) or stops()):
                take(it, loss, count, stop, sums)
                if reports(it):
                    report(it, learning_rate)
                if evaluates(it) and not stops():
                    validate(it)
                halt = stops() and latest  # a stop signal: stop at the step the model is at
                plateau = evaluates(it) and plateaued()  # (validation syncs: no later step was launched)
                if saves(it) or halt or plateau:
                    save(it)
                if halt:
                    say(f"Interrupted at iteration {it}. Go on with the same flags and --resume {checkpoint}")
                    raise utils.Stopped(interrupted[0] if interrupted else signal.SIGINT)  # else another rank's
                if plateau:
                    say(f"Iter {it}: Early stopping: {config.early_stopping_patience} validations without a lower "
                        f"validation loss.{best_kept()}")
                    break
            if interrupted:  # during the last save
                raise utils.Stopped(interrupted[0])
        except RuntimeError as e:
            if group.size() == 1:
                raise
            kept = f"; the last checkpoint is {checkpoint}" if checkpoint else ""
            raise UserError(f"the distributed run lost a process ({utils.first_line(e)}){kept}") from None
        except utils.Stopped as e:
            stopped = e
            if not writer:  # rank 0 says what was kept
                raise utils.Stopped(e.signum, "") from None
            kept = (f"the adapters saved last are in {adapter_file}, the last checkpoint is {checkpoint}"
                    if checkpoint else "this run saved nothing")
            resume = checkpoint or config.resume
            # the --resume to go on with last: the line's end, which a user copies
            go_on = f" Go on with the same flags and --resume {resume}" if resume else ""
            ending = best_kept() + go_on
            raise utils.Stopped(e.signum, f"{e}: {kept}" + (f".{ending}" if ending else "")) from None
        finally:
            bar.close()
            utils.release_stops()
            log.close()
            if writer and not stopped:  # stopped: at once (a resumed run plots the whole run)
                plot_losses(metrics_path, folder / "loss.png", objective.shown)
        seconds["steps"] = training_time() - began - seconds["first step"] - seconds["saving"]
        left = time.perf_counter()
    seconds["reloading weights"] = time.perf_counter() - left  # those the frozen layers' pass released
    return seconds


def prepared(model, objective, train_set, valid_set, config):
    """What the objective computes before training (Objective.prepare) for the validation set and for the
    training examples that the run's steps read: a run shorter than an epoch reads fewer, and from iteration 1
    on even when resumed, so that a resumed run's are the whole run's. Also for the first batch of the file,
    which a run that validates nothing evaluates before saving (train's check_before_saving). The examples
    nothing reads get NaN."""
    k, batch_size = objective.rows_per_example, objective.examples_per_batch(config.batch_size)
    examples = len(train_set) // k
    read = examples_read(train_set, batch_size, config.seed, config.sort_by_length,
                         objective.data_steps(config.iters) * config.grad_accumulation_steps, k)
    read = np.arange(examples) if read is None else np.union1d(read, np.arange(batch_size))
    if len(read) == examples:
        return objective.prepare(model, [train_set, valid_set])
    given, valid_given = objective.prepare(model, [train_set.of(read, k), valid_set])
    if given is None:
        return [given, valid_given]
    every = np.full((examples, *given.shape[1:]), np.nan, given.dtype)
    every[read] = given
    return [every, valid_given]


def new_run_folder(runs: Path) -> Path:
    """runs/N for the next N: each training run writes its checkpoints and metrics in a folder of its own, so
    that it never touches another run's (the caller holds the output folder's lock)."""
    runs.mkdir(parents=True, exist_ok=True)
    for folder in runs.iterdir():
        utils.remove_leftovers(folder)
    folder = runs / str(max((int(p.name) for p in runs.iterdir() if p.name.isdigit()), default=0) + 1)
    folder.mkdir()
    return folder


def save_checkpoint(folder, it, model, optimizer, adapter_config, config, saved, best):
    """FOLDER/step-N: the adapters (an adapter folder, as --adapter-file and fuse.py read it), the optimizer
    state and trainer_state.json (with `best`, the early stopping's state: train); written whole or not at all.
    `saved` lists this run's checkpoints: only the last --keep-checkpoints of them are kept."""
    def write(tmp):
        utils.save_adapters(tmp / "adapters.safetensors", model, adapter_config)
        utils.save_safetensors(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer.state)), {})
        # the data order and the dropout masks are functions of the seed and the position (iterate_batches,
        # train): these numbers are all it takes to go on exactly
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"iteration": it, "batches": it * config.grad_accumulation_steps, "seed": config.seed, **best,
             "args": config.flags}, indent=2))

    path = folder / f"step-{it:07d}"
    utils.write_folder(path, write)
    saved.append(path)
    if config.keep_checkpoints > 0:
        for old in saved[:-config.keep_checkpoints]:
            shutil.rmtree(old)
        del saved[:-config.keep_checkpoints]
    return path


# The flags that make a resumed run differ from the run it continues (--iters too, where the learning rate
# decays to 0 at --iters). --pack is not one: packed batches give the same losses and gradients.
RESULT_FLAGS = ("model", "data", "train_mode", "fine_tune_type", "lora_layers", "lora_targets", "lora_rank",
                "use_rslora", "lora_plus_ratio", "init_lora_weights",
                "lora_dropout", "max_seq_length", "add_eos_token", "mask_prompt", "batch_size", "grad_accumulation_steps",
                "learning_rate", "optimizer", "weight_decay", "lr_schedule", "warmup", "max_grad_norm",
                "sort_by_length", "seed", *OBJECTIVE_FLAGS, "train_split", *FEATURE_FLAGS)


def changed_flags(saved: dict, args) -> list:
    """The flags of RESULT_FLAGS that differ from those a checkpoint was saved with (vars(args) then)."""
    now = vars(args)
    keys = RESULT_FLAGS + (("iters",) if args.lr_schedule != "constant" else ())
    changed = [f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in keys if k in saved and saved[k] != now[k]]
    if "lora_scale" in saved and lora_scale(saved) != lora_scale(now):
        changed.append(f"the LoRA scale {lora_scale(saved)} (now {lora_scale(now)})")
    return changed


def checkpoint_state(path) -> dict:
    """The trainer_state.json of a checkpoint folder (save_checkpoint)."""
    state_file = Path(path) / "trainer_state.json"
    if not state_file.is_file():
        raise UserError(f"--resume {path}: not a checkpoint folder (no trainer_state.json)")
    state = utils.read_json(state_file)
    it = state.get("iteration")
    if not isinstance(it, int) or isinstance(it, bool) or it < 0 or not isinstance(state.get("args"), dict):
        raise UserError(f"{state_file}: expected the iteration (a whole number) and the run's flags (args)")
    metric, step, counter = (state.get(key) for key in ("best_metric", "best_global_step",
                                                         "early_stopping_patience_counter"))
    if not (metric is None or utils.is_number(metric)) or not all(
            n is None or isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (step, counter)):
        raise UserError(f"{state_file}: best_metric, best_global_step and early_stopping_patience_counter must be "
                        f"numbers (or null)")
    return state


def check_resume(args):
    """Before anything is loaded: --resume's checkpoint is one, before --iters, and the flags that change the
    result are its own (else an error listing them, unless --accept-flag-changes)."""
    state = checkpoint_state(args.resume)
    if state["iteration"] >= args.iters:
        raise UserError(f"--iters {args.iters}: the checkpoint {args.resume} is at iteration {state['iteration']} "
                        f"already; give more --iters to go on")
    changed = changed_flags(state["args"], args)
    if changed and not args.accept_flag_changes:
        raise UserError(f"--resume {args.resume}: the run was trained with other flags: {', '.join(changed)}; "
                        f"resume with its flags, or pass --accept-flag-changes to go on with these")
    if changed:
        print(f"[WARNING] --resume {args.resume}: going on with other flags than the run's: {', '.join(changed)}.")


def checkpoint_arrays(path, model, optimizer):
    """The iteration, adapter weights, optimizer state and early stopping's state of a checkpoint
    (save_checkpoint), checked against the model and the optimizer as the flags set them up."""
    path = Path(path)
    state = checkpoint_state(path)
    it = state["iteration"]
    best = {"best_metric": state.get("best_metric"), "best_global_step": state.get("best_global_step"),
            "early_stopping_patience_counter": state.get("early_stopping_patience_counter") or 0}
    if (path / "adapter_config.json").exists():  # of the run's base (check_resume compares --model)
        utils.check_base_model(model, utils.read_json(path / "adapter_config.json"), path)
    weights = utils.read_arrays(path / "adapters.safetensors")
    utils.check_finite(weights, path / "adapters.safetensors")
    try:  # the file holds a stack of experts' adapters per expert, PiSSA's as adapters of the original weights
        weights = models.trained_adapters(model, model.args.names.stacked(weights, model.args.num_local_experts))
    except ValueError:
        weights = {}  # an error below
    expected = {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}
    if {k: v.shape for k, v in weights.items()} != expected:
        raise UserError(f"--resume {path}: its weights do not fit the model that --fine-tune-type, --lora-layers, "
                        f"--lora-targets and --lora-rank set up; resume with the flags of the run that saved it")
    moments = utils.read_arrays(path / "optimizer.safetensors")
    optimizer.init(model.trainable_parameters())  # the state it keeps, which the file replaces
    if {k: v.shape for k, v in moments.items()} != {k: v.shape for k, v in tree_flatten(optimizer.state)}:
        raise UserError(f"{path / 'optimizer.safetensors'}: does not hold the state of --optimizer "
                        f"{type(optimizer).__name__} for these adapters")
    utils.check_finite(moments, path / "optimizer.safetensors")
    return it, weights, moments, best


def read_metrics(path: Path) -> list:
    """The records of a metrics.jsonl file."""
    records = []
    for number, record in utils.read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise UserError(f"{path}:{number}: not a record of an iteration")
        records.append(record)
    return records


def resumed_metrics(config, start) -> list:
    """The records of the run that --resume continues, up to its checkpoint's iteration `start`."""
    previous = Path(config.resume).parent / "metrics.jsonl" if config.resume else None
    return [r for r in read_metrics(previous) if r["iteration"] <= start] if previous and previous.exists() else []


def metrics_log(path, kept, config):
    """log(record): append the record to metrics.jsonl, which starts with the records `kept`, and send it to
    --report-to; and close(). Path None: a log that writes nothing (ranks of a distributed run but 0)."""
    if path is None:
        log = lambda record: None  # noqa: E731
        log.close = lambda: None
        return log
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    sinks, closers = [], []
    if config.report_to == "wandb":
        import wandb

        run = wandb.init(project="lora-mlx", config=config.flags, resume="allow")
        sinks.append(lambda record: run.log(record, step=record["iteration"]))
        closers.append(run.finish)
    elif config.report_to == "tensorboard":
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(path.parent / "tensorboard"))
        sinks.append(lambda record: [writer.add_scalar(k, v, record["iteration"])
                                     for k, v in record.items() if k != "iteration"])
        closers.append(writer.close)

    def log(record):
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"{path}: cannot be written ({e.strerror or e})") from None
        for sink in sinks:
            sink(record)

    log.close = lambda: [close() for close in closers]
    return log


def plot_losses(metrics_path, png_path, metrics=()):
    """The training and validation curves of metrics.jsonl as a PNG: the loss, and beside it each of `metrics`
    (those the objective's log lines show: a preference objective's rewards/accuracies and rewards/margins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:  # a run stopped before its first report
        return
    names = ["loss", *metrics]
    fig, axes = plt.subplots(1, len(names), figsize=(2 + 5 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        for key, label in (("train_loss" if name == "loss" else name, "train"), (f"val_{name}", "validation")):
            points = [(r["iteration"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if label == "validation" else None, label=label)
        ax.set(xlabel="iteration", ylabel=name, title=name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    utils.atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def eta_seconds(elapsed, first_step, done_after_first, left):
    """The seconds the `left` steps will take, at the pace of the steps after the first: the first is mostly
    compiling (on a GPU that has not run MLX before, a minute or more), and counting it would put the end of a
    run of seconds an hour away."""
    if done_after_first == 0:
        return elapsed * left
    return (elapsed - first_step) / done_after_first * left


@contextlib.contextmanager
def timed(seconds: Counter, part: str):
    """Adds the seconds the block takes to seconds[part]."""
    began = time.perf_counter()
    try:
        yield
    finally:
        seconds[part] += time.perf_counter() - began


def say(line):
    """A line of the log, printed above the progress bar."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def peak_memory(group) -> float:
    """The peak memory of this process, or in a distributed run the largest of the ranks'."""
    peak = mx.get_peak_memory()
    return peak if group.size() == 1 else mx.distributed.all_max(mx.array(float(peak)), group=group).item()


def diverged(it, what, adapter_file, checkpoint, lowering_helps=True, best=""):
    """Stop training. Every save was checked to give a finite loss (train's check_before_saving): the last one,
    if this run saved any, holds the last adapters known to be good; `best` says where the best are."""
    if checkpoint is not None:
        kept = f"{adapter_file} and {checkpoint} hold the adapters saved last, whose loss was finite"
    else:
        kept = "this run saved nothing" + (f"; {adapter_file} is as it was" if adapter_file.exists() else "")
    advice = ("Try a lower --learning-rate." if lowering_helps else
              "Not the learning rate: the weights and adapters are finite, the model's computation is not.")
    raise UserError(f"iteration {it}: {what}; training stopped ({kept}).{best} {advice}")


# Evaluation


def evaluate(model, dataset, batch_size, num_batches, objective=None, given=None):
    """The mean loss of the objective (default SFT) over the first num_batches batches (-1: all), and its metrics
    by name; `given`: what the dataset's examples carry (Objective.prepare). In a distributed run each rank
    evaluates its share of each batch, and the sums are summed."""
    objective = objective or SFT()
    totals = mx.zeros(2 + len(objective.sums))  # loss x count, count, sums
    batches = iterate_batches(dataset, objective.examples_per_batch(batch_size), objective=objective, given=given)
    batches = itertools.islice(batches, None if num_batches < 0 else num_batches)  # (before generated() makes them)
    for batch in objective.generated(model, batches, False):
        statistics = across_ranks(objective.statistics(model, batch))  # every rank takes part in the sum
        if batch is None:  # no example of this batch is this rank's
            mx.eval(statistics)  # its part of the sum, which nothing here reads (lazy, it would not be taken)
            continue
        loss, count, sums = objective.loss(model, batch, statistics)
        totals = totals + mx.concatenate([mx.stack([loss * count, count.astype(loss.dtype)]), sums])
        mx.eval(totals)  # one batch's graph at a time, not the whole set's
    group = mx.distributed.init()
    if group.size() > 1:
        totals = mx.distributed.all_sum(totals, group=group)
    loss, count, *sums = totals.tolist()
    return loss / count, objective.metric_values(sums, count)


def completion_example(record, marker, where, objective):
    """The example as {"prompt", "completion"} (or a chat, whose completion is its last assistant message): a
    {"text"} example is split after the last `marker`, another is the objective's answer (a preference pair's
    chosen response)."""
    if "messages" in record and not any(m["role"] == "assistant" for m in record["messages"]):
        raise UserError(f"--generate-eval: {where}: no assistant message to compare the generated one with")
    if "text" not in record:
        example = objective.answer(record)
        if example.get("prompt") == "":  # (a chat's: generation_length)
            raise UserError(f"--generate-eval: {where} has an empty prompt, nothing to generate from")
        return example
    if not marker:
        raise UserError('--generate-eval: the test examples are {"text"}: give --completion-marker, the text '
                        'that ends each prompt (e.g. "A: ")')
    # whitespace after the marker goes with the completion: a prompt ending in a space tokenizes unlike the
    # text the model was trained on (" SELECT" is one token, " " + "SELECT" two)
    head, found, tail = record["text"].rpartition(marker.rstrip())
    if not found:
        raise UserError(f"--completion-marker {marker!r}: not in {where}")
    return {"prompt": head + found, "completion": tail}


def generation_accuracy(model, tokenizer, config, examples, add_eos, where):
    """Exact matches among the greedy completions of these examples (completion_example; where(i) names the
    i-th in errors). A completion matches if its text is the expected one's, end-of-sequence (or a chat
    template's end of turn) included: a model that goes on past the answer has not given it."""
    prompts, expected, lengths = [], [], []
    for i, record in enumerate(examples):
        tokens, spans = encode(record, tokenizer, add_eos)
        start, end = spans[-1]
        prompts.append(tokens[:start])
        expected.append(tokens[start:end])
        lengths.append(generation_length(model, tokenizer, prompts[-1], len(expected[-1]), f"{where(i)}'s prompt"))
    matches = 0
    for first in tqdm(range(0, len(prompts), GENERATION_BATCH), desc="Generating", disable=None):
        batch = slice(first, first + GENERATION_BATCH)
        completions = utils.generate_batch(model, prompts[batch], lengths[batch], eos_ids=eos_ids(tokenizer, config))
        matches += sum(tokenizer.decode(completion.tokens).strip() == tokenizer.decode(answer).strip()
                       for completion, answer in zip(completions, expected[batch]))
    return matches


# Generation


def eos_ids(tokenizer, config):
    config_eos = config.get("eos_token_id")
    return {tokenizer.eos_token_id, *(config_eos if isinstance(config_eos, list) else [config_eos])}


def check_token_ids(ids, model, tokenizer, where):
    """MLX's embedding crashes the process (a segfault) on a token id past the model's vocabulary: such an id,
    from a tokenizer that is not the model's, is an error naming where it came from."""
    top = max(ids, default=-1)
    if top >= model.args.vocab_size:
        raise UserError(f"{where}: token id {top} is past the model's vocab_size {model.args.vocab_size}; the "
                        f"tokenizer has {len(tokenizer)} tokens: is it the model's?")


def generation_length(model, tokenizer, prompt, max_tokens, where) -> int:
    """How many of max_tokens to generate after `prompt` (token ids): fewer where the model's context
    (max_position_embeddings) ends first. A prompt of no tokens, of ids past the vocabulary, that fills the
    context, or whose keys, values and attention scores would not fit in memory is an error naming `where`
    (the kernel would otherwise kill the process, out of memory)."""
    args, length = model.args, len(prompt)
    if not prompt:
        raise UserError(f"{where}: gives no tokens")
    check_token_ids(prompt, model, tokenizer, where)
    if length >= args.max_position_embeddings:
        raise UserError(f"{where}: {length} tokens, but the model's context (max_position_embeddings) is "
                        f"{args.max_position_embeddings}; shorten it")
    positions = min(length + max_tokens, args.max_position_embeddings)
    itemsize = model.model[args.final_norm].weight.dtype.size
    cache = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * positions * itemsize
    # the prompt's pass, a layer at a time: its MLP's activations and, on the CPU, where attention computes every
    # score (a GPU's fused kernel keeps none), the scores and weights, in float32
    scores = 2 * args.num_attention_heads * length * length * 4 if mx.default_device() == mx.cpu else 0
    layer = scores + 3 * length * args.intermediate_size * itemsize
    need, free = cache + layer, memory_size() - mx.get_active_memory()
    if need > free:
        raise UserError(f"{where}: {length} tokens, and {positions - length} to generate after them, need about "
                        f"{need / 1e9:.1f} GB of memory, more than the {free / 1e9:.1f} GB left beside the model")
    return positions - length


def generate(model, tokenizer, config, args):
    eos = eos_ids(tokenizer, config)
    prompt = tokenizer.encode(args.prompt)
    length = generation_length(model, tokenizer, prompt, args.max_tokens, "--prompt")
    print(args.prompt, end="", flush=True)
    tokens, printed = [], ""

    def show(_, token):
        nonlocal printed
        if token in eos:
            return
        tokens.append(token)
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(printed):], end="", flush=True)
            printed = text

    try:
        utils.generate_batch(model, [prompt], length, temp=args.temp, top_p=args.top_p, top_k=args.top_k,
                             min_p=args.min_p, eos_ids=eos, on_token=show)
    finally:  # the line ends, however generation ends
        print(tokenizer.decode(tokens)[len(printed):], flush=True)


def read_prompt_file(path) -> list:
    """(line number, record) of each prompt of --prompt-file: in a .jsonl file, {"prompt": text or a chat} or
    {"messages": a chat}, other keys kept; else each line of the text as {"prompt": line}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompt-file {path}: no such file")
    if path.suffix == ".jsonl":
        records = utils.read_jsonl(path)
        for number, record in records:
            prompt = record.get("messages", record.get("prompt")) if isinstance(record, dict) else None
            if not (isinstance(prompt, str) and prompt or is_messages(prompt)):
                raise UserError(f'--prompt-file {path}:{number}: not {{"prompt": text}} or {{"messages": a chat}}, '
                                f'with a non-empty prompt')
    else:
        lines = utils.read_text(path).split("\n")
        if lines[-1] == "":  # the newline that ends the last line
            lines.pop()
        records = [(number, {"prompt": line.removesuffix("\r")}) for number, line in enumerate(lines, 1)]
        empty = next((number for number, record in records if not record["prompt"].strip()), None)
        if empty is not None:
            raise UserError(f"--prompt-file {path}:{empty}: an empty line; give one prompt a line")
    if not records:
        raise UserError(f"--prompt-file {path}: no prompts")
    return records


def answers_path(args) -> Path:
    """Where --prompt-file's answers go: --output, or beside it as NAME.answers.jsonl."""
    path = Path(args.prompt_file)
    return Path(args.output) if args.output else path.with_name(f"{path.stem}.answers.jsonl")


def prompt_tokens(record, tokenizer) -> list:
    """The token ids of a --prompt-file record's prompt: its text, or its chat with the generation prompt."""
    chat = record["messages"] if "messages" in record else record["prompt"]
    if isinstance(chat, str):
        return tokenizer.encode(chat)
    if not tokenizer.chat_template:
        raise UserError(f"a chat, and the tokenizer of {tokenizer.name_or_path} has no chat template")
    try:
        with utils.bounded(*TEMPLATE_LIMITS):  # the sandbox lets a template loop without end
            text = tokenizer.apply_chat_template(chat, tools=record.get("tools"), tokenize=False,
                                                 add_generation_prompt=True)
    except Exception as e:  # a chat template raises what its Jinja code raises, or refuses (sandboxed)
        raise UserError(f"the chat template of {tokenizer.name_or_path} fails on it "
                        f"({type(e).__name__}: {utils.first_line(e)})") from None
    return tokenizer.encode(text, add_special_tokens=False)


def answer_prompt_file(model, tokenizer, config, args, records):
    """Generate the answers to --prompt-file's prompts, GENERATION_BATCH at a time, and write them (answers_path)."""
    prompts, lengths = [], []
    for number, record in records:
        where = f"{args.prompt_file}:{number}"
        try:
            prompts.append(prompt_tokens(record, tokenizer))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        lengths.append(generation_length(model, tokenizer, prompts[-1], args.max_tokens, where))
    answers = []
    for first in tqdm(range(0, len(prompts), GENERATION_BATCH), desc="Generating", disable=None):
        batch = slice(first, first + GENERATION_BATCH)
        completions = utils.generate_batch(model, prompts[batch], lengths[batch], temp=args.temp, top_p=args.top_p,
                                           top_k=args.top_k, min_p=args.min_p, eos_ids=eos_ids(tokenizer, config))
        answers += [{**record, "answer": utils.completion_text(completion, tokenizer), "finish": completion.finish}
                    for (_, record), completion in zip(records[batch], completions)]
    out = answers_path(args)
    utils.atomic_write(out, lambda f: f.write("".join(json.dumps(a, ensure_ascii=False) + "\n"
                                                      for a in answers).encode()))
    print(f"Wrote {len(answers)} answers to {out}", flush=True)


# Main


def list_targets(path):
    config, weights, _ = utils.read_checkpoint(path, "--list-targets", tokenizer=False)
    model = utils.model_skeleton(config, weights)
    default = models.default_lora_targets(model)
    tied = ", tied: one adapter adapts both" if model.args.tie_word_embeddings else ""
    print(f"{path}: {config['model_type']}, {len(model.layers)} decoder layers, with these linear layers "
          f"(input -> output features); --lora-targets takes their paths, last parts or patterns, and embed_tokens "
          f"and lm_head, the embedding and output layer{tied}:")
    for target, module in models.every_linear_layer(model.layers).items():
        output_dims, input_dims = module.weight.shape[-2:]  # (an expert's, of a stack)
        print(f"  {target:40} {input_dims:6} -> {output_dims:<6} {'(default)' if target in default else ''}".rstrip())


def main(args):
    if args.list_targets:
        return list_targets(args.list_targets)
    adapter_file = Path(args.adapter_file or DEFAULT_ADAPTER_FILE)
    # Data errors come before the model is loaded, which can take minutes.
    splits = (["train"] + (["valid"] if args.val_batches else []) if args.train else []) + (["test"] if args.test else [])
    training = training_args(args)
    columns = {key: getattr(args, flag) for flag, key in FEATURE_FLAGS.items()}
    dataset_splits = {split: getattr(args, f"{split}_split") for split in DATASET_SPLITS}
    examples = {split: load_dataset(args.data, split, args.mask_prompt, training.objective, columns, dataset_splits)
                for split in splits}
    if args.epochs and args.train:  # the schedule's length and the checkpoints' flags follow
        args.iters = epoch_iterations(len(examples["train"]), args, training.objective)
        training = training_args(args)
    answered = [i for i, record in enumerate(examples.get("test", [])) if training.objective.answer(record)]
    generation_tests = [completion_example(examples["test"][i], args.completion_marker, examples["test"].where(i),
                                           training.objective) for i in answered[:args.generate_eval]]
    prompts = read_prompt_file(args.prompt_file) if args.prompt_file else None
    if prompts:
        if answers_path(args).resolve() == Path(args.prompt_file).resolve():
            raise UserError(f"--output {answers_path(args)}: is --prompt-file itself; write the answers elsewhere")
        utils.check_writable(answers_path(args), "--output")
    if args.resume:
        check_resume(args)
    group = distributed(args, training.objective)
    # So is an output folder that cannot be written, or that another run is writing.
    out = adapter_file.parent
    writes = args.train and group.rank() == 0
    with utils.exclusive(out, "--adapter-file", out / ".lora.lock") if writes else contextlib.nullcontext():
        if writes:
            check_outputs(adapter_file)
        run(args, training, adapter_file, examples, generation_tests, answered, prompts)


def epoch_iterations(examples, args, objective) -> int:
    """The iterations of --epochs passes over `examples` training examples, as batch_order forms the batches: up
    to the last that trains on the last batch (GRPO trains on each --num-iterations times)."""
    # fewer examples than a batch: an error in run()
    batches = args.epochs * max(examples // objective.examples_per_batch(args.batch_size), 1)
    steps = math.ceil(batches / args.grad_accumulation_steps)
    return next(n for n in itertools.count(steps) if objective.data_steps(n + 1) > steps)


def best_adapter_file(adapter_file: Path) -> Path:
    """Where training keeps the adapters of the lowest validation loss: adapters.best.safetensors beside
    adapters.safetensors."""
    return adapter_file.with_name(f"{adapter_file.stem}.best{adapter_file.suffix}")


def check_outputs(adapter_file: Path):
    """That each file training writes can be written (utils.check_writable): the adapters, the best adapters and
    adapter_config.json beside them, and the runs/ folder that holds the checkpoints and metrics."""
    utils.check_writable(adapter_file, "--adapter-file")
    utils.check_writable(best_adapter_file(adapter_file), "--adapter-file")
    utils.check_writable(utils.adapter_config_path(adapter_file), "--adapter-file")
    utils.check_writable(adapter_file.parent / "runs", "--adapter-file", folder=True)


def distributed(args, objective):
    """The group of processes that mlx.launch (or mpirun) started, each of them checked to make an equal share
    of every batch; all but rank 0 print nothing."""
    group = utils.distributed_group("lora.py")
    n = group.size()
    if n == 1:
        return group
    examples = objective.examples_per_batch(args.batch_size)
    if args.train and examples % n:
        raise UserError(f"--batch-size {args.batch_size}: its {examples} examples must divide by the {n} processes of "
                        f"the distributed run (each makes an equal share of every batch)")

    # mlx.launch ends the other ranks so when one ends
    utils.stop_on_sigterm("lora.py", "stopped by the launcher: another process of the distributed run ended")
    if group.rank() > 0:
        sys.stdout = open(os.devnull, "w")
    print(f"Data-parallel on {n} processes: each makes {args.batch_size // n} of the {args.batch_size} examples "
          f"of every batch", flush=True)
    return group


def run(args, training, adapter_file, examples, generation_tests, answered, prompts=None):
    objective = training.objective
    mx.random.seed(args.seed)
    scale = lora_scale(vars(args))
    print(f"Loading pretrained model {args.model}", flush=True)
    began = time.perf_counter()
    model, tokenizer, config = utils.load(args.model)
    adapted = args.train or adapter_file.exists() or args.adapter_file
    adapters = None
    if adapted and not args.train:
        with utils.naming_flag("--adapter-file"):
            adapters = utils.read_adapters(adapter_file, scale)
            tokenizer = utils.adapters_tokenizer(adapters, adapter_file, model) or tokenizer
    seconds = {"loading": time.perf_counter() - began}
    data = {split: tokenize(e, tokenizer, args.add_eos_token, args.max_seq_length, split, args.mask_prompt, objective)
            for split, e in examples.items()}
    for split, rows in data.items():
        check_token_ids((max(tokens) for tokens, _ in rows), model, tokenizer, examples[split].path)
    seconds["tokenizing"] = time.perf_counter() - began - seconds["loading"]
    rows = objective.rows_per_example  # an example's
    for split, batches in (("valid", args.val_batches), ("test", args.test_batches)):  # what evaluate() reads
        if split in data and batches > 0:
            data[split] = data[split].head(batches * objective.examples_per_batch(args.batch_size), rows)
    model.freeze()
    if args.train:
        needed = objective.examples_per_batch(args.batch_size)
        if len(data["train"]) < needed * rows:
            raise UserError(f"{examples['train'].path}: {len(data['train']) // rows} examples, fewer than a batch of "
                            f"--batch-size {args.batch_size} ({needed})")
        adapter_config = set_up_training(model, args, scale)
        trained = dict(tree_flatten(model.trainable_parameters()))
        if utils.adapts_embeddings(trained) and mx.distributed.init().rank() == 0:
            utils.save_tokenizer(adapter_file.parent, tokenizer)  # (adapters_tokenizer)
    # a reference is the model as training starts (as TRL's: new adapters change nothing yet), else the model as
    # loaded; train() computes the training and validation sets' own
    test_given = objective.prepare(model, [data["test"]])[0] if args.test else None
    if args.train:
        model.grad_checkpoint = args.grad_checkpoint
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        # a quantized weight counts its values, not the 32-bit words they are packed in
        total = sum(v.size * 32 // m.bits if k == "weight" and hasattr(m, "bits") else v.size
                    for _, m in model.named_modules() for k, v in m.items()
                    if isinstance(v, mx.array) and k not in ("scales", "biases"))
        print(f"Trainable parameters: {trainable / 1e6:.3f}M of {total / 1e6:.3f}M "
              f"({100 * trainable / total:.3f}%)", flush=True)
        print("Training" + (f" for {args.epochs} epochs: {args.iters} iterations" if args.epochs else ""), flush=True)
        seconds.update(train(model, data["train"], data.get("valid", []), training, adapter_file, adapter_config))
        model.grad_checkpoint = False
        print("Seconds: " + ", ".join(f"{part} {s:.2f}" for part, s in seconds.items() if s >= 0.005), flush=True)
    elif adapted:
        with utils.naming_flag("--adapter-file"):
            utils.apply_adapters(model, adapters, adapter_file, base=args.model)
    else:
        print(f"No adapter file ({adapter_file}): using the base model.", flush=True)
    model.eval()

    if args.test:
        test_loss, test_metrics = evaluate(model, data["test"], args.batch_size, args.test_batches, objective,
                                           test_given)
        if not math.isfinite(test_loss):  # a result no one should read as one
            used = f"with the adapters {adapter_file}" if adapted else "without adapters"
            raise UserError(f"--test: the loss of the model {used} on {examples['test'].path} is {test_loss}")
        print(f"Test loss {test_loss:.3f}{objective.test_line(test_loss, test_metrics)}.", flush=True)
        if generation_tests and mx.distributed.init().rank() == 0:
            with utils.naming_flag("--generate-eval"):
                matches = generation_accuracy(model, tokenizer, config, generation_tests, args.add_eos_token,
                                              lambda k: examples["test"].where(answered[k]))
            print(f"Test exact match {matches}/{len(generation_tests)} ({100 * matches / len(generation_tests):.1f}%), "
                  f"greedy.", flush=True)
    if args.prompt is not None and mx.distributed.init().rank() == 0:
        with utils.naming_flag("--prompt"):
            generate(model, tokenizer, config, args)
    if prompts and mx.distributed.init().rank() == 0:
        with utils.naming_flag("--prompt-file"):
            answer_prompt_file(model, tokenizer, config, args, prompts)


if __name__ == "__main__":
    utils.set_up_process()
    utils.run_main("lora.py", lambda: main(parse_args()))
