"""Merge LoRA or DoRA adapters (or load fully fine-tuned layers) into the base model's weights and save the
result in the Hugging Face layout or as a GGUF file, or export the adapters as a PEFT folder or a LoRA GGUF
file; optionally upload the fused model."""
import contextlib
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_unflatten

import models
import utils
from utils import UserError

DEFAULT_SAVE_PATH = "lora_fused_model"
# what the model card and upload say was fused in, by fine_tune_type
FUSED = {**{name: kind.described for name, kind in models.ADAPTER_KINDS.items()}, "full": "fine-tuned weights"}


def build_parser():
    p = utils.ArgumentParser(description="Fuse LoRA or DoRA adapters (or fully fine-tuned weights) into the "
                                            "model, or export the adapters to PEFT or GGUF.")
    p.add_argument("--model", type=utils.expanded_path, default="mlx_model",
                   help="Base model: folder (Hugging Face layout), Hugging Face repo id, or .gguf file.")
    p.add_argument("--adapter-file", type=utils.expanded_path,
                   help="Adapters: a .safetensors/.npz file, an mlx-lm adapter folder or a PEFT folder (default "
                        "adapters.safetensors, else adapters.npz: a training run's last adapters; its best are in "
                        "adapters.best.safetensors); adapters of embed_tokens or lm_head bring the tokenizer saved "
                        "beside them, if any, rather than --model's.")
    p.add_argument("--save-path", type=utils.expanded_path,
                   help=f"Folder for the fused model (default {DEFAULT_SAVE_PATH}; with an --export flag, none unless "
                        f"given).")
    p.add_argument("--de-quantize", action="store_true", help="Save a quantized base's fused model in float16.")
    p.add_argument("--export-peft", type=utils.expanded_path, metavar="DIR",
                   help="Write the adapters, unfused, as a PEFT folder.")
    p.add_argument("--export-gguf", type=utils.expanded_path, metavar="PATH",
                   help="Write the fused model as a float16 GGUF file for llama.cpp.")
    p.add_argument("--export-gguf-adapter", type=utils.expanded_path, metavar="PATH",
                   help="Write the LoRA adapters, unfused, as a GGUF file that llama.cpp applies to the base "
                        "model's GGUF file (llama-cli -m base.gguf --lora PATH); not DoRA, which llama.cpp lacks.")
    p.add_argument("--upload-name", help="Upload the fused model to this Hugging Face repo.")
    p.add_argument("--hf-path", "--hf-repo", dest="hf_path",
                   help="The base model's Hugging Face repo, named in the model card and the PEFT config.")
    p.add_argument("--force", action="store_true",
                   help="Replace --save-path / --export-peft if not empty, and an --export-gguf(-adapter) file.")
    return p


def fuse(args):
    if args.adapter_file is None:
        args.adapter_file = next((f for f in ("adapters.safetensors", "adapters.npz") if Path(f).exists()),
                                 "adapters.safetensors")
    save_path = args.save_path or (None if args.export_peft or args.export_gguf or args.export_gguf_adapter
                                   else DEFAULT_SAVE_PATH)
    if args.upload_name and not save_path:
        raise UserError("--upload-name uploads the fused model: give --save-path too")
    # every check that can fail comes before the model is loaded
    sources = [args.model, args.adapter_file]
    out = utils.output_folder(save_path, "--save-path", args.force, sources) if save_path else None
    outputs = [(out, "--save-path")] if out else []
    if args.export_peft:
        outputs.append((utils.output_folder(args.export_peft, "--export-peft", args.force, sources), "--export-peft"))
    for flag, gguf in (("--export-gguf", args.export_gguf), ("--export-gguf-adapter", args.export_gguf_adapter)):
        if gguf:
            outputs.append((gguf_output(Path(gguf), flag, args.force, sources), flag))
    if args.export_gguf_adapter:
        adapter_gguf = outputs[-1][0]
        for path, flag in outputs[:-1]:  # writing one of the two would replace the other
            if utils.is_within(adapter_gguf, path):
                raise UserError(f"--export-gguf-adapter {adapter_gguf}: is {flag} {path} or inside it; write it "
                                f"elsewhere")
    with contextlib.ExitStack() as locks:  # two runs writing the same output: the second is refused
        for path, flag in outputs:
            locks.enter_context(utils.exclusive(path, flag, path.parent / f".{path.name}.lock"))
        write_fused(args, out)


def gguf_output(gguf: Path, flag: str, force: bool, sources) -> Path:
    """The GGUF file `flag` names, checked before any work: that it can be written and is no source; an existing
    one replaced only with force, and only if a GGUF file."""
    utils.check_writable(gguf, flag)  # a folder in its place too
    if any(Path(s).exists() and utils.is_within(Path(s), gguf) for s in sources):
        raise UserError(f"{flag} {gguf}: is a file fuse.py reads")
    if gguf.exists() and not force:
        raise UserError(f"{flag} {gguf}: exists (pass --force to replace it)")
    if gguf.exists() and not starts_as_gguf(gguf):
        raise UserError(f"{flag} {gguf}: is not a GGUF file, the only kind --force replaces; move it yourself or "
                        f"write elsewhere")
    return gguf


def starts_as_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def write_fused(args, out):
    with utils.naming_flag("--upload-name"):
        api = utils.hub_client(args.upload_name) if args.upload_name else None
    with utils.naming_flag("--adapter-file"):
        adapters = utils.read_adapters(args.adapter_file)
    if args.export_peft and adapters.fine_tune_type == "full":
        raise UserError(f"--export-peft: {args.adapter_file} holds fully fine-tuned weights (fine_tune_type "
                        f"\"full\"), not adapters PEFT can hold; fuse them with --save-path instead")
    if args.export_gguf_adapter and adapters.fine_tune_type != "lora":
        raise UserError(f"--export-gguf-adapter: {args.adapter_file} holds {FUSED[adapters.fine_tune_type]} "
                        f"(fine_tune_type \"{adapters.fine_tune_type}\"): llama.cpp's adapter files hold LoRA "
                        f"adapters alone; fuse them into a GGUF file with --export-gguf instead")

    model, tokenizer, config = utils.load(args.model)
    with utils.naming_flag("--adapter-file"):
        tokenizer = utils.adapters_tokenizer(adapters, args.adapter_file, model) or tokenizer
    model.freeze()
    if args.export_gguf:
        with utils.naming_flag("--export-gguf"):
            utils.check_gguf_export(model, tokenizer)
    utils.apply_adapters(model, adapters, args.adapter_file, base=args.model)
    if args.export_gguf_adapter:
        with utils.naming_flag("--export-gguf-adapter"):
            utils.check_gguf_adapter_export(model, adapters.config)
    base = args.hf_path or args.model
    if args.export_peft:
        refused = [path for path in models.lora_layers(model) if path.endswith(model.args.family.peft_refused)]
        if refused:
            raise UserError(f"--export-peft: {args.adapter_file} adapts {refused[0]}, whose adapters PEFT refuses "
                            f"to load on {model.args.model_type}; fuse them with --save-path instead")
        utils.save_peft(args.export_peft, model, base, adapters.config)
        print(f"Wrote the adapters as a PEFT folder to {args.export_peft}", flush=True)
    if args.export_gguf_adapter:
        with utils.naming_flag("--export-gguf-adapter"):
            utils.write_gguf_adapter(args.export_gguf_adapter, model, adapters.config)
        print(f"Wrote the adapters as a LoRA GGUF file to {args.export_gguf_adapter}", flush=True)
    if out is None and not args.export_gguf:
        return

    model.update_modules(tree_unflatten([(path, m.to_linear()) for path, m in models.lora_layers(model).items()]))
    if args.de_quantize:
        models.dequantize(model, mx.float16)
    quantized = {path: {"group_size": m.group_size, "bits": m.bits} for path, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, models.QuantizedExpertsLinear))}
    config = utils.output_config(config, "float16" if args.de_quantize else None, quantized)

    def write(folder):
        fused = f"the model fused with {args.adapter_file}" + (", de-quantized to float16" if args.de_quantize else "")
        utils.save_model(folder, model, tokenizer, config, what=fused)
        (folder / "README.md").write_text(utils.model_card(
            args.upload_name or str(out), base, f"the base with {FUSED[adapters.fine_tune_type]} "
                                                f"`{args.adapter_file}` fused in"))

    if out is not None:
        utils.write_folder(out, write)
        print(f"Wrote the fused model to {out}", flush=True)
    if args.export_gguf:
        models.dequantize(model, mx.float16)
        utils.write_gguf(args.export_gguf, model, tokenizer)
        print(f"Wrote the fused model as GGUF to {args.export_gguf}", flush=True)
    if api is not None:
        with utils.naming_flag("--upload-name"):
            utils.upload(api, out, args.upload_name, f"{base} with {FUSED[adapters.fine_tune_type]} fused in")


if __name__ == "__main__":
    utils.set_up_process()
    utils.run_main("fuse.py", lambda: fuse(build_parser().parse_args()))
