"""The training benchmark: a lora.py recipe (its own flags) run for --warmup-steps untimed and --steps timed
steps, on a model (--model) or on random weights of a named shape built in memory (--shape), so that the
same command runs anywhere. Prints one JSON line to stdout: trained tokens/s (real tokens: no padding, no
masked prompt), steps/s, peak memory, the final loss, and the arithmetic floor; progress goes to stderr.

    python benchmarks/bench.py --shape smollm2-135m --data data/
    python benchmarks/bench.py --shape llama-7b --seq-length 1024 --batch-size 4 --peak-tflops 989  # on a GPU
"""
import contextlib
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import convert  # noqa: E402
import lora  # noqa: E402
import models  # noqa: E402
import random_checkpoint  # noqa: E402
import utils  # noqa: E402
from utils import UserError  # noqa: E402


def build_parser():
    p = lora.build_parser()
    p.description = "Benchmark training: lora.py's flags give the recipe; prints one JSON line."
    p.add_argument("--shape", choices=sorted(random_checkpoint.SHAPES),
                   help="Instead of --model, random weights of this shape, built in memory (bf16, or float32 on "
                        "the CPU).")
    p.add_argument("--tokenizer", help="Tokenizer folder (default: --model's; with --shape, a byte-level BPE "
                                       "trained on --data).")
    p.add_argument("--warmup-steps", type=utils.NON_NEGATIVE_INT, default=5, help="Untimed steps first (compilation, allocation).")
    p.add_argument("--steps", type=utils.POSITIVE_INT, default=20, help="Timed steps.")
    p.add_argument("--seq-length", type=utils.flag_type(int, lambda v: v >= 2, "an integer of at least 2"), help="Train on rows of this many random tokens instead of --data "
                                                  "(--batch-size rows a batch; not cut to --max-seq-length).")
    p.add_argument("--peak-tflops", type=utils.POSITIVE, help="The device's peak TFLOP/s, for the floor's tokens/s.")
    # convert.py's quantization flags, as they are there: -q quantizes the model in memory as convert.py -q would
    flags = {a.dest: a for a in convert.build_parser()._actions}
    for dest in ("quantize", "q_bits", "q_group_size", "q_embedding_bits"):
        p._add_action(flags[dest])
    return p


def load_model(args):
    """(model, tokenizer or None, config): --shape's random weights or --model's, quantized with -q."""
    if args.shape:
        config = dict(random_checkpoint.SHAPES[args.shape], torch_dtype="bfloat16")
        weights, tokenizer = dict(random_checkpoint.random_weights(config, "bfloat16")), None
    else:
        config, weights, tokenizer = utils.read_checkpoint(args.model)
    if args.quantize:
        dtype = utils.compute_dtype(config)  # the scales' type: the one the model computes in
        tensors, quantized, _ = convert.converted_weights(
            config, weights, dtype, {"group_size": args.q_group_size, "bits": args.q_bits}, args.q_embedding_bits)
        names = models.checkpoint_names(config)  # the checkpoint's names back to the model's, as reading gives them
        weights = names.stacked({names.ours(k): v for k, v in tensors})
        config = utils.output_config(config, quantized=quantized)
    return utils.build_model(config, weights), tokenizer, config


def training_set(args, objective, examples, tokenizer, vocab_size):
    """(tokens, first scored target) rows: --data's, tokenized as lora.py does, or rows of --seq-length random
    tokens (the model reads all of them; all but the last have a target; objective.rows_per_example rows an
    example, half of them labelled desirable where the objective reads labels)."""
    if args.seq_length:
        examples = 8 * args.batch_size
        rows = np.random.default_rng(args.seed).integers(0, vocab_size, (examples * objective.rows_per_example,
                                                                          args.seq_length))
        labels = np.arange(examples) % 2.0 if "label" in objective.record_keys else None
        return lora.Rows([(row.tolist(), 0) for row in rows], labels)
    if args.tokenizer:
        tokenizer = random_checkpoint.fitting_tokenizer(args.tokenizer, vocab_size)
    elif tokenizer is None:
        texts = [e.get("text") or str(e.get("prompt", "")) + e.get("completion", str(e.get("chosen", "")))
                 for e in examples]
        tokenizer = random_checkpoint.train_tokenizer(texts, min(random_checkpoint.TOKENIZER_VOCAB, vocab_size))
    return lora.tokenize(examples, tokenizer, args.add_eos_token, args.max_seq_length, "train", args.mask_prompt,
                         objective)


def flops_per_token(config, first_trained, length, full, first_computed=0):
    """The floor: FLOPs a training step needs per token. A weight of the layers the step runs (from
    first_computed: those below are cached, lora.frozen_prefix) costs 2 (a multiply-add) in the forward pass,
    and 2 more in the backward pass for the gradient of its input if its layer is at or above the first trained
    one (the output layer always): back-propagation stops below. Full fine-tuning adds 2 per trained weight for
    its own gradient. Attention adds, per layer, 2 * length * its width forward (scores and weighted sum, each
    2 * length/2 per token: causal) and twice that backward. Left out: the adapters (rank << width), norms,
    activations, the loss; sliding windows; the experts of the families whose checkpoints stack them. Of the
    others' experts (models.ExpertsLinear), those a token is routed to count."""
    model = utils.model_skeleton(config, {})  # unevaluated, unquantized: the weights' shapes at no cost
    args = model.args
    routed = args.num_experts_per_tok / max(args.num_local_experts, 1)
    layers = [sum(m.weight.size * (routed if isinstance(m, models.ExpertsLinear) else 1)
                  for _, m in layer.named_modules() if isinstance(m, (nn.Linear, models.ExpertsLinear)))
              for layer in model.layers]
    computed, trained, head = layers[first_computed:], layers[first_trained:], args.vocab_size * args.hidden_size
    attention = 2 * length * args.num_attention_heads * args.head_dim
    forward = 2 * (sum(computed) + head) + attention * len(computed)
    backward = 2 * (sum(trained) + head) + 2 * attention * len(trained) + (2 * sum(trained) if full else 0)
    return forward + backward


def timed_steps(model, dataset, training, given, warmup_steps, steps):
    """(last loss, trained tokens, seconds, peak memory before them) of `steps` timed training steps after
    `warmup_steps` untimed ones (`given`: what the examples carry, Objective.prepare)."""
    step = lora.make_step(model, lora.build_optimizer(training), training)
    batches = lora.iterate_batches(dataset, training.batch_size, train=True, seed=training.seed, pack=training.pack,
                                   sort=training.sort_by_length, objective=training.objective, given=given)

    def launch(i):
        return step(batches)

    for i, _, (loss, *_) in lora.pipelined(launch, range(warmup_steps)):
        print(f"Warm-up step {i + 1}/{warmup_steps}: loss {loss:.3f}", flush=True)
    setup_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    trained_tokens, start = 0, time.perf_counter()
    for i, _, (loss, _, _, sums) in lora.pipelined(launch, range(steps)):
        trained_tokens += int(sums[0])
        print(f"Step {i + 1}/{steps}: loss {loss:.3f}, {trained_tokens / (time.perf_counter() - start):.1f} "
              f"tokens/s", flush=True)
    return loss, trained_tokens, time.perf_counter() - start, setup_peak


def run(args):
    if args.config:
        raise UserError("--config is lora.py's alone: give the recipe's flags on the command line")
    args.train = True  # for lora.check_flags: what it checks of a training run holds here
    lora.check_flags(args)
    training = lora.training_args(args)
    objective, per_example = training.objective, training.objective.rows_per_example
    group = lora.distributed(args, objective)  # under mlx.launch: data-parallel, as lora.py trains
    examples = None if args.seq_length else lora.load_dataset(args.data, "train", args.mask_prompt,
                                                              objective)  # data errors first

    print(f"Loading {'random ' + args.shape if args.shape else args.model}", flush=True)
    model, tokenizer, config = load_model(args)
    dataset = training_set(args, objective, examples, tokenizer, model.args.vocab_size)
    if len(dataset) < args.batch_size * per_example:
        raise UserError(f"{args.data}/train.jsonl: {len(dataset) // per_example} examples, fewer than --batch-size")
    mx.random.seed(args.seed)
    model.freeze()
    adapter_config = lora.set_up_training(
        model, args, args.lora_scale if args.lora_alpha is None else args.lora_alpha / args.lora_rank)
    model.grad_checkpoint = args.grad_checkpoint
    start = time.perf_counter()
    # the weights released for the frozen layers' pass are not read back: the model is not used after
    with lora.frozen_layers_cached(model, [dataset], training, args.iters, source=None) as (dataset,):
        prefix, prefix_seconds = model.frozen_prefix, time.perf_counter() - start
        given = objective.prepare(model, [dataset])[0]
        reference_seconds = time.perf_counter() - start - prefix_seconds
        loss, trained_tokens, seconds, setup_peak = timed_steps(model, dataset, training, given, args.warmup_steps,
                                                                args.steps)
        peak = lora.peak_memory(group)
    rows = args.steps * args.grad_accumulation_steps * args.batch_size * per_example
    flops = flops_per_token(config, lora.first_trained_layer(model), trained_tokens / rows,
                            args.fine_tune_type == "full", prefix.layer if prefix else 0)
    info = mx.device_info()
    return {
        "model": None if args.shape else args.model, "shape": args.shape,
        "device": f"{mx.default_device().type.name}: {info.get('device_name', '?')}",
        "dtype": str(utils.compute_dtype(config)).rsplit(".", 1)[-1],
        # -q's or the checkpoint's own (a quantized GGUF file, a folder convert.py -q wrote)
        "quantization": sorted({f"{m.bits}-bit, group size {m.group_size}"
                                for _, m in model.named_modules() if hasattr(m, "bits")}) or None,
        "data": None if args.seq_length else args.data, "seq_length": args.seq_length, "train_mode": args.train_mode,
        "batch_size": args.batch_size, "grad_accumulation_steps": args.grad_accumulation_steps,
        "max_seq_length": args.max_seq_length, "mask_prompt": args.mask_prompt, "pack": args.pack,
        "sort_by_length": args.sort_by_length,
        "grad_checkpoint": args.grad_checkpoint, "optimizer": args.optimizer, "learning_rate": args.learning_rate,
        **{k: v for k, v in adapter_config.items() if k != "base_model"},
        "trainable_parameters": sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
        "warmup_steps": args.warmup_steps, "steps": args.steps,
        # all ranks' tokens, and what each rank's share of every batch gives (the ranks step together)
        "ranks": group.size(), "tokens_per_second": trained_tokens / seconds,
        "tokens_per_second_per_rank": trained_tokens / seconds / group.size(), "steps_per_second": args.steps / seconds,
        "peak_memory_gb": peak / 1e9, "final_loss": loss,
        # the peak before the timed steps: loading, the frozen layers' pass, warm-up
        "setup_peak_memory_gb": setup_peak / 1e9,
        # DPO's, KTO's: the model's log-probabilities of every example's rows, computed once before training
        "reference_pass_seconds": reference_seconds if given is not None else None,
        "frozen_prefix": prefix and {"layers": prefix.layer, "seconds": prefix_seconds,
                                     "gb": prefix.states.nbytes / 1e9},
        # trained tokens/s over a whole run of --iters steps, the frozen layers' pass included
        "run_tokens_per_second": trained_tokens / args.steps * args.iters / (
            seconds / args.steps * args.iters + (prefix_seconds if prefix else 0)),
        "trained_tokens": trained_tokens, "seconds": seconds,
        "floor": {"flops_per_token": flops, "peak_tflops": args.peak_tflops,
                  "tokens_per_second": args.peak_tflops * 1e12 / flops if args.peak_tflops else None},
        "mlx": mx.__version__,
    }


def main():
    with contextlib.redirect_stdout(sys.stderr):  # what lora.py and convert.py print is progress
        result = run(build_parser().parse_args())
    if mx.distributed.init().rank() == 0:  # one line for a distributed run
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    utils.set_up_process()
    utils.run_main("bench.py", main)
