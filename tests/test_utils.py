"""utils.py: GGUF files of each tensor type, the hub, sampling."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import utils
from conftest import FP32_ATOL, write_gguf

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
