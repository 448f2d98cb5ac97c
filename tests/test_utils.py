"""utils.py: GGUF files of each tensor type, the hub, sampling."""
import json

import mlx.core as mx
import numpy as np
import pytest
import torch

import utils
from conftest import FP32_ATOL

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


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_loads_with_matching_logits(make_checkpoint, tmp_path, qtype):
    from gguf import GGMLQuantizationType

    folder, reference = make_checkpoint("llama")
    stored = write_gguf(tmp_path / "tiny.gguf", folder, reference, GGMLQuantizationType[qtype])
    model, tokenizer, config = utils.load(str(tmp_path / "tiny.gguf"))
    assert config["num_key_value_heads"] == 2 and not config["tie_word_embeddings"]
    quantized = qtype.startswith("Q")
    assert ("scales" in model.layers[0].self_attn.q_proj) == quantized  # quantized tensors stay quantized

    # the reference computes with the weights as stored in the file, dequantized
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in stored.items()})
    tokens = tokenizer.encode("Q: the team when year is 7\nA: SELECT team FROM t WHERE year = 7")
    assert len(tokens) > 10  # the tokenizer came from the file's metadata
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits.numpy()
    assert np.abs(np.array(model(mx.array([tokens]))) - expected).max() <= FP32_ATOL


def test_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(utils.UserError, match="GGUF architecture 'falcon' is not supported"):
        utils.load(str(tmp_path / "m.gguf"))


def test_hub_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(utils.UserError, match=r"cannot fetch 'some-org/some-model' from the Hugging Face hub"):
        utils.load("some-org/some-model")
    with pytest.raises(utils.UserError, match="no such file or folder"):
        utils.load("./not/here")


def test_sampling():
    logits = mx.log(mx.array([[0.05, 0.6, 0.3, 0.05]]))
    assert utils.sample(logits, temp=0, top_p=1.0).item() == 1
    mx.random.seed(0)
    nucleus = [utils.sample(logits, temp=1.0, top_p=0.8).item() for _ in range(200)]
    assert set(nucleus) == {1, 2}  # 0.6 + 0.3 reach 0.8; the tail is never drawn
    everything = [utils.sample(logits, temp=1.0, top_p=1.0).item() for _ in range(400)]
    assert set(everything) == {0, 1, 2, 3}
