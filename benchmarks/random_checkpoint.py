"""Write a checkpoint of a named shape with random weights, in the Hugging Face layout, so that
benchmarks and memory measurements run anywhere without a download:

    python benchmarks/random_checkpoint.py llama-1b /tmp/llama-1b --max-shard-size 1
    python benchmarks/random_checkpoint.py qwen3-30b-a3b /tmp/qwen3-30b-a3b-4bit --quantize

The weights are generated one at a time as the shards are written (memory stays near one shard), quantized
as convert.py -q quantizes them with --quantize (a large model's float checkpoint need never be written). The
tokenizer is a byte-level BPE trained on data/train.jsonl, whose ids fit any of the shapes' vocabularies,
or a real one copied with --tokenizer DIR.
"""
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import convert  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
         "bos_token_id": 1, "eos_token_id": 2}
# Qwen3.5's language models: three linear attention layers to one attention layer
QWEN3_5 = {"hidden_act": "silu", "num_attention_heads": 16, "head_dim": 256, "linear_num_key_heads": 16,
           "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
           "linear_conv_kernel_dim": 4, "full_attention_interval": 4, "vocab_size": 248320, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 32768, "tie_word_embeddings": False,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}}
SHAPES = {
    "llama-7b": dict(LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5,
                     max_position_embeddings=4096),
    "mistral-7b": dict(LLAMA, model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, rms_norm_eps=1e-5, sliding_window=4096,
                       max_position_embeddings=32768),
    "llama-1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                     rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3.1-8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                        rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen3-8b": dict(LLAMA, model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     tie_word_embeddings=False, max_position_embeddings=40960),
    "gemma3-4b": dict(LLAMA, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=2560,
                      intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=256, vocab_size=262208, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                      query_pre_attn_scalar=256, sliding_window=1024, sliding_window_pattern=6,
                      rope_theta=1000000.0, rope_local_base_freq=10000.0,
                      rope_scaling={"rope_type": "linear", "factor": 8.0}, tie_word_embeddings=True,
                      max_position_embeddings=131072),
    "smollm2-135m": dict(LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192),
    "qwen3-30b-a3b": dict(LLAMA, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
                          intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                          max_position_embeddings=40960),
    # Qwen3.5 as the hub holds it (the vision-language model, its language model in text_config: mlx-lm reads this
    # model_type, not the text one), without the image encoder; the sizes are transformers' Qwen3_5TextConfig and
    # Qwen3_5MoeTextConfig defaults, which their docstrings give as Qwen3.5-9B's and Qwen3.5-35B-A3B's
    "qwen3.5-9b": dict(LLAMA, model_type="qwen3_5", architectures=["Qwen3_5ForConditionalGeneration"],
                       tie_word_embeddings=False, text_config=dict(QWEN3_5, model_type="qwen3_5_text", hidden_size=4096,
                                                                   intermediate_size=12288, num_hidden_layers=32,
                                                                   num_key_value_heads=4)),
    "qwen3.5-35b-a3b": dict(LLAMA, model_type="qwen3_5_moe", architectures=["Qwen3_5MoeForConditionalGeneration"],
                            tie_word_embeddings=False, text_config=dict(
                                QWEN3_5, model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=40,
                                num_key_value_heads=2, num_experts=256, num_experts_per_tok=8,
                                moe_intermediate_size=512, shared_expert_intermediate_size=512)),
}


# ample for a data set's own words, and within every shape's vocabulary
TOKENIZER_VOCAB = 4000


def fitting_tokenizer(folder, vocab_size: int):
    """The tokenizer in `folder`, checked to give ids below vocab_size."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises OSError, ValueError or others for a missing or odd tokenizer
        raise utils.UserError(f"--tokenizer {folder}: cannot load it ({type(e).__name__}: "
                              f"{utils.first_line(e)})") from None
    if len(tokenizer) > vocab_size:
        raise utils.UserError(f"--tokenizer {folder}: {len(tokenizer)} tokens, more than the model's vocabulary "
                              f"({vocab_size})")
    return tokenizer


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def random_weights(config: dict, dtype: str, seed: int = 0):
    """(name, array) pairs of random weights for the model `config` describes, each computed when evaluated,
    under the model's names (convert.converted_weights gives the checkpoint's)."""
    # never evaluated: gives the parameters' names and shapes at no cost
    model = models.make_model(models.ModelArgs.from_config(config))
    mx.random.seed(seed)
    for name, value in tree_flatten(model.parameters()):
        if value.ndim == 1:  # norms
            yield name, mx.ones(value.shape, getattr(mx, dtype))
        else:
            yield name, (0.02 * mx.random.normal(value.shape)).astype(getattr(mx, dtype))


def write(path, shape: str, dtype: str = "bfloat16", shard_bytes: int = 5 * 10**9, seed: int = 0, tokenizer=None,
          quantize=False):
    """The checkpoint, with `tokenizer` (a folder) or else one trained on data/train.jsonl; quantized as convert.py
    -q quantizes by default if `quantize`."""
    config = dict(SHAPES[shape], torch_dtype=dtype)
    vocab_size = models.ModelArgs.from_config(config).vocab_size  # (a vision-language model's in text_config)
    if tokenizer is None:
        texts = [json.loads(line)["text"] for line in (ROOT / "data" / "train.jsonl").open()]
        tokenizer = train_tokenizer(texts, min(TOKENIZER_VOCAB, vocab_size))
    else:  # checked before the weights, which can take minutes
        tokenizer = fitting_tokenizer(tokenizer, vocab_size)

    flags = convert.build_parser()
    quantization = {"group_size": flags.get_default("q_group_size"), "bits": flags.get_default("q_bits")}

    def write_checkpoint(folder):
        tensors, quantized, _ = convert.converted_weights(
            config, dict(random_weights(config, dtype, seed)), getattr(mx, dtype), quantization if quantize else None,
            flags.get_default("q_embedding_bits"))
        utils.save_weights(folder, tensors, shard_bytes)
        (folder / "config.json").write_text(json.dumps(utils.output_config(config, quantized=quantized), indent=2))
        tokenizer.save_pretrained(str(folder))

    utils.write_folder(Path(path), write_checkpoint)


if __name__ == "__main__":
    p = utils.ArgumentParser(description="Write a random-weight checkpoint of a named shape.")
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("path", help="Folder to write.")
    p.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--max-shard-size", type=utils.POSITIVE, default=5.0, help="Largest shard, in GB.")
    p.add_argument("--tokenizer", help="Copy this tokenizer (a folder) instead of training one on data/train.jsonl.")
    p.add_argument("--quantize", action="store_true",
                   help="Write it quantized as convert.py -q does (4-bit, group size 64; embedding and output layer "
                        "8-bit), the float weights never written.")
    args = p.parse_args()
    utils.run_main("random_checkpoint.py", lambda: write(args.path, args.shape, args.dtype,
                                                         int(args.max_shard_size * 1e9), tokenizer=args.tokenizer,
                                                         quantize=args.quantize))
