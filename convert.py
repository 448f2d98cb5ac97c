"""Convert a Hugging Face checkpoint (folder, hub repo id or GGUF file) into an MLX model folder in the
Hugging Face layout, optionally quantized for QLoRA (-q), and optionally upload it (--upload-name)."""
import json
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

import models
import utils
from utils import UserError

DTYPES = ("float16", "bfloat16", "float32")
BITS = (2, 3, 4, 5, 6, 8)
# They lose the most to quantization (every token passes through them, and the output layer's errors go
# straight into the logits), and are a small part of the weights: llama.cpp and PEFT's QLoRA spare them too.
EMBEDDING_LAYERS = ("model.embed_tokens", "lm_head")


def build_parser():
    p = utils.ArgumentParser(description="Convert a Hugging Face model to MLX, optionally quantized.")
    p.add_argument("--hf-path", type=utils.expanded_path, required=True,
                   help="Hugging Face model folder, hub repo id, or .gguf file to convert.")
    p.add_argument("--mlx-path", type=utils.expanded_path, default="mlx_model",
                   help="Folder to write the MLX model to.")
    p.add_argument("--dtype", choices=DTYPES,
                   help="Type of the float weights (default: the checkpoint's own, else float16).")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize the weights (for QLoRA).")
    p.add_argument("--q-bits", type=int, default=4, choices=BITS, help="Bits per weight.")
    p.add_argument("--q-embedding-bits", type=int, default=8, choices=BITS,
                   help="Bits per weight of the token embedding and the output layer (lm_head).")
    p.add_argument("--q-group-size", type=int, default=64, choices=(32, 64, 128),
                   help="Weights sharing one scale and bias.")
    p.add_argument("--upload-name", help="Upload the converted model to this Hugging Face repo, "
                                         "e.g. mlx-community/Mistral-7B-v0.1-4bit.")
    p.add_argument("--max-shard-size", type=utils.POSITIVE, default=5.0,
                   help="Largest weight file, in GB; conversion holds about one in memory.")
    p.add_argument("--force", action="store_true", help="Replace --mlx-path if it exists and is not empty.")
    return p


def converted_weights(config: dict, weights: dict, dtype, quantization, embedding_bits=None, where="the model"):
    """The output weights as (name, array) pairs, computed lazily one at a time, under the checkpoint's names;
    the quantization of each quantized layer (the model's paths; the token embedding and output layer at
    embedding_bits); and the number of linear layers left in dtype. Quantized inputs are dequantized first.
    Checks, before anything is computed, that the weights are those the config describes (of the model
    `where`, named in errors)."""
    model = utils.model_skeleton(config, weights)  # never evaluated: no memory, only names and shapes
    modules = dict(model.named_modules())
    expected = tree_flatten(model.parameters())
    source = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    for path, module in modules.items():
        params = utils.quantization_of(source, path, module)
        if params:
            # in float32 (MLX computes in the scales' type): 16-bit scales times integers are not 16-bit numbers
            scales, biases = (source.pop(f"{path}.{k}").astype(mx.float32) for k in ("scales", "biases"))
            source[f"{path}.weight"] = mx.dequantize(source.pop(f"{path}.weight"), scales, biases, **params)
    missing = [name for name, _ in expected if name not in source]
    unexpected = sorted(set(source) - {name for name, _ in expected})
    wrong = [f"{name} {tuple(source[name].shape)} (expected {tuple(v.shape)})"
             for name, v in expected if name in source and source[name].shape != v.shape]
    for problem, names in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise UserError(f"{where}: the weights do not fit its config: {problem}: {', '.join(names[:3])}{more}")

    # A router (Family.unquantized): a few numbers per token decide which experts run; AutoAWQ and bitsandbytes
    # QLoRA keep it unquantized too, and it is a tiny part of the weights.
    kept = model.args.family.unquantized
    # Only nn.Linear, nn.Embedding and SparseMoE's experts (models.ExpertsLinear): the stacked experts' weights of
    # the families whose checkpoints stack them (models.StackedExperts, StackedLinear) and the routers
    # (models.Router) stay in dtype.
    layers = {path for path, m in modules.items()
              if isinstance(m, (nn.Linear, nn.Embedding, models.ExpertsLinear)) and not (kept and path.endswith(kept))}
    quantized = {}  # path: {"group_size", "bits"}
    for path in sorted(layers) if quantization else []:
        if source[f"{path}.weight"].shape[-1] % quantization["group_size"] == 0:
            bits = embedding_bits if path in EMBEDDING_LAYERS else quantization["bits"]
            quantized[path] = dict(quantization, bits=bits)
    if quantization and not quantized:
        raise UserError(f"--q-group-size {quantization['group_size']}: no layer's input size is a multiple of it")

    def tensors():
        for name, _ in tqdm(expected, desc="Converting", unit="tensor", file=sys.stdout):
            value = source.pop(name)  # dropped once written
            path, leaf = name.rsplit(".", 1)
            if leaf == "weight" and path in quantized:
                weight, scales, biases = mx.quantize(value, **quantized[path])
                yield from ((name, weight), (f"{path}.scales", scales.astype(dtype)),
                            (f"{path}.biases", biases.astype(dtype)))
            else:
                yield name, value.astype(dtype)

    names = model.args.names  # (a float stack of experts' as each expert's)
    return (((names.theirs(k), v) for name, value in tensors() for k, v in names.unstacked(name, value)), quantized,
            len(layers) - len(quantized))


def describe(args) -> str:
    if not args.quantize:
        return args.dtype
    embedding = (f" (embedding and output layer {args.q_embedding_bits}-bit)"
                 if args.q_embedding_bits != args.q_bits else "")
    return f"{args.q_bits}-bit{embedding}, group size {args.q_group_size}, {args.dtype} scales"


def convert(args):
    """Write the converted model to --mlx-path: into a temporary folder beside it, renamed at the end, so
    that a failed or interrupted conversion leaves nothing half-written."""
    out = utils.output_folder(args.mlx_path, "--mlx-path", args.force, sources=[args.hf_path])
    with utils.exclusive(out, "--mlx-path", out.parent / f".{out.name}.lock"):
        write_converted(args, out)


def write_converted(args, out):
    with utils.naming_flag("--upload-name"):
        api = utils.hub_client(args.upload_name) if args.upload_name else None
    config, weights, tokenizer = utils.read_checkpoint(args.hf_path, "--hf-path")
    if args.dtype is None:
        own = config.get("dtype") or config.get("torch_dtype")
        args.dtype = own if own in DTYPES else "float16"
    quantization = {"group_size": args.q_group_size, "bits": args.q_bits} if args.quantize else None
    tensors, quantized, unquantized = converted_weights(config, weights, getattr(mx, args.dtype), quantization,
                                                        args.q_embedding_bits, args.hf_path)
    del weights  # a source tensor, once read, would stay in memory as long as anything refers to it

    config = utils.output_config(config, args.dtype, quantized)

    def write(folder):
        utils.save_weights(folder, tensors, int(args.max_shard_size * 1e9))
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(folder))
        (folder / "README.md").write_text(utils.model_card(args.upload_name or args.mlx_path, args.hf_path,
                                                           f"converted to MLX ({describe(args)})"))

    utils.write_folder(out, write)
    print(f"Wrote {out} ({describe(args)})", flush=True)
    if quantization and unquantized:
        print(f"{unquantized} layers stay {args.dtype}: their input size is not a multiple of the group size",
              flush=True)

    if api is not None:
        with utils.naming_flag("--upload-name"):
            utils.upload(api, out, args.upload_name, f"converted from {args.hf_path}")


if __name__ == "__main__":
    utils.set_up_process()
    utils.run_main("convert.py", lambda: convert(build_parser().parse_args()))
