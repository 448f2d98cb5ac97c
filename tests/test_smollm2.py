"""The real SmolLM2-135M-Instruct, from its Q4_1 GGUF (skipped where the wheel cannot be fetched)."""
import mlx.core as mx
import numpy as np
import pytest
import torch

import models
import utils
from conftest import ROOT, run_lora, val_losses


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return utils.load(str(smollm2_gguf))


def france(model, tokenizer):
    """The greedy answer to "What is the capital of France?"."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = tokenizer.encode(chat, add_special_tokens=False)
    answer = utils.generate_batch(model, [prompt], 30, eos_ids=[tokenizer.eos_token_id])[0]
    return utils.completion_text(answer, tokenizer)


def test_greedy_answer_names_paris(smollm2):
    assert "Paris" in france(smollm2[0], smollm2[1])


def test_logits_match_transformers_on_the_dequantized_weights(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, config = smollm2
    tokens = tokenizer.encode("table: 1-10015132-16\ncolumns: Player, No., Nationality\nQ: What is terrence "
                              "ross' nationality\nA: SELECT Nationality FROM 1-10015132-16")
    quantized_logits = np.array(model(mx.array([tokens])))
    models.dequantize(model)
    utils.save_model(tmp_path, model, tokenizer, dict(config, dtype="float32"))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits.numpy()
    # 30 layers in fp32 with logits of magnitude ~20: agreement to a few 1e-4
    assert np.abs(np.array(model(mx.array([tokens]))) - expected).max() < 1e-3
    # the 4-bit model at rest computes with the same (dequantized) weights
    assert np.abs(quantized_logits - expected).max() < 1e-3


def test_short_lora_run_lowers_the_validation_loss(smollm2_gguf, tmp_path, capsys):
    out = run_lora(capsys, "--model", smollm2_gguf, "--data", ROOT / "data", "--train", "--iters", 16,
                   "--learning-rate", 2e-4, "--eval-on-start", "--steps-per-eval", 16, "--val-batches", 4,
                   "--steps-per-report", 8,
                   "--adapter-file", tmp_path / "adapters.safetensors")
    val = val_losses(out)
    assert val[16] < val[1] - 0.2, out


def test_tokenizer_matches_transformers_gguf_reader(smollm2, smollm2_gguf):
    from transformers import AutoTokenizer

    ours = smollm2[1]
    reference = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    for text in ["What is the capital of France?", "  two spaces, ünïcödé and 日本語\n\tSELECT * FROM t;",
                 "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == reference.encode(text)
        assert ours.decode(ours.encode(text)) == text
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert (ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (reference.bos_token, reference.eos_token,
                                                                reference.pad_token)


def test_trained_adapters_in_peft_fused_and_in_gguf(smollm2_gguf, tmp_path, capsys):
    """Adapters trained by lora.py on the dequantized base: PEFT loads them on transformers' model with the
    same logits; fused (a folder, a GGUF file), the model answers the France prompt as it did unfused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import convert
    import fuse

    base = tmp_path / "base"
    convert.convert(convert.build_parser().parse_args(["--hf-path", str(smollm2_gguf), "--mlx-path", str(base),
                                                       "--dtype", "float32"]))
    adapters = tmp_path / "adapters.safetensors"
    run_lora(capsys, "--model", base, "--data", ROOT / "data", "--train", "--iters", 4, "--learning-rate", 2e-4,
             "--lora-targets", "q_proj", "v_proj", "down_proj", "--val-batches", 1, "--adapter-file", adapters)
    for flags in (["--export-peft", tmp_path / "peft"], ["--save-path", tmp_path / "fused"],
                  ["--export-gguf", tmp_path / "fused.gguf"]):
        fuse.fuse(fuse.build_parser().parse_args(["--model", str(base), "--adapter-file", str(adapters),
                                                  *map(str, flags)]))

    model, tokenizer, _ = utils.load(str(base))
    utils.load_adapters(model, adapters)
    tokens = tokenizer.encode("table: 1-10015132-16\ncolumns: Player, No., Nationality\nQ: What is terrence "
                              "ross' nationality\nA: SELECT Nationality FROM 1-10015132-16")
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "peft").eval()
    with torch.no_grad():
        expected = peft_model(torch.tensor([tokens])).logits.numpy()
    assert np.abs(np.array(model(mx.array([tokens]))) - expected).max() < 1e-3

    answer = france(model, tokenizer)
    assert "Paris" in answer
    assert france(*utils.load(str(tmp_path / "fused"))[:2]) == answer
    assert france(*utils.load(str(tmp_path / "fused.gguf"))[:2]) == answer
