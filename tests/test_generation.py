"""Batched generation (utils.generate_batch): prompts of different lengths generated together give, row by row,
what each gives alone and what the model's whole-sequence logits give, in every kind of layer; ends per row;
sampling's filters and seed."""
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import random_adapter, run_lora
from mlx import nn
from test_data import chat_model  # noqa: F401 (a fixture)
from test_families import FAMILIES

import lora
import models
import utils

# lengths: two alike (one group through the model), one prompt twice (a group of completions), the longest past
# gemma2's window below
LENGTHS = (3, 11, 7, 11, 20)


def prompts_of(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 300, n).tolist() for n in lengths]
    return prompts + [prompts[1]]


def greedy_without_cache(model, prompt, n):
    """n tokens, each the argmax of the whole sequence's last logits: no cache, no padding."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(mx.argmax(model(mx.array([tokens]))[0, -1]).item())
    return tokens[len(prompt):]


def check_greedy(model, n=12):
    prompts = prompts_of()
    batched = utils.generate_batch(model, prompts, n)
    for prompt, completion in zip(prompts, batched):
        assert completion == utils.Completion(greedy_without_cache(model, prompt, n), "length")
        assert utils.generate_batch(model, [prompt], n) == [completion]


@pytest.fixture(scope="module")
def llama(make_checkpoint):
    return make_checkpoint("llama")


@pytest.mark.parametrize("model_type", ["gemma2", "lfm2", "qwen3_5", "granitemoehybrid", "falcon_h1"])
def test_greedy_batch_is_each_prompt_alone(make_checkpoint, model_type):
    """A sliding window shorter than the prompts (gemma2); short convolutions (LFM2), gated delta-rule linear
    attention (Qwen3.5) and Mamba-2 (Granite 4; Falcon-H1's beside attention) that carry a state a pad must not
    enter."""
    config = {**FAMILIES[model_type][0], **({"sliding_window": 6} if model_type == "gemma2" else {})}
    folder, _ = make_checkpoint(model_type, **config)
    check_greedy(utils.load(str(folder))[0])


@pytest.mark.parametrize("kind", ["float", "quantized", "lora", "dora"])
def test_greedy_batch_on_llama(llama, kind, tmp_path):
    """The model as it is: quantized, or with adapters (non-zero B) applied, not fused."""
    if kind in ("lora", "dora"):
        model = random_adapter(llama[0], tmp_path / "adapters.safetensors", dora=kind == "dora")
    else:
        model = utils.load(str(llama[0]))[0]
    if kind == "quantized":
        models.quantize(model, lambda path, m: {"group_size": 32, "bits": 4}
                        if isinstance(m, (nn.Linear, nn.Embedding)) else None)
    check_greedy(model)


def test_greedy_matches_transformers(llama):
    folder, reference = llama
    model = utils.load(str(folder))[0]
    prompts = prompts_of()
    for prompt, completion in zip(prompts, utils.generate_batch(model, prompts, 12, eos_ids=[2])):
        with torch.no_grad():  # (each alone: transformers' own padding would change its output)
            expected = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                          max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
        assert completion.tokens == expected[0, len(prompt):].tolist()


def test_each_row_ends_at_its_eos_or_stop_string(llama):
    """A row ends at its first end-of-sequence token (kept) or once its text holds a stop string, the others
    going on; completion_text cuts before the stop string and drops the end-of-sequence token."""
    model, tokenizer, _ = utils.load(str(llama[0]))
    prompts, n = prompts_of(), 16
    greedy = [c.tokens for c in utils.generate_batch(model, prompts, n)]
    eos = greedy[0][4]
    stop = tokenizer.decode(greedy[2][5:7])
    completions = utils.generate_batch(model, prompts, n, eos_ids=[eos, 299], stop=[stop, "never"],
                                       tokenizer=tokenizer)
    finishes = set()
    for tokens, completion in zip(greedy, completions):
        ends = [k + 1 for k in range(n) if tokens[k] == eos][:1]
        stops = [k for k in range(1, n + 1) if stop in tokenizer.decode(tokens[:k])][:1]
        end = min(ends + stops + [n])
        finish = "eos" if ends and end == ends[0] else "stop" if stops and end == stops[0] else "length"
        assert completion == utils.Completion(tokens[:end], finish)
        text = utils.completion_text(completion, tokenizer, stop)
        assert text == (tokenizer.decode(tokens[:end - 1]) if finish == "eos" else
                        tokenizer.decode(tokens[:end]).split(stop)[0])
        finishes.add(finish)
    assert finishes == {"eos", "stop", "length"}
    assert completions[0].tokens[-1] == eos and completions[0].finish == "eos"
    assert completions[2].finish in ("eos", "stop")
    limited = utils.generate_batch(model, prompts[:3], [0, 2, 5])
    assert [(len(c.tokens), c.finish) for c in limited] == [(0, "length"), (2, "length"), (5, "length")]


def test_seed_repeats_the_sampled_completions(llama):
    model = utils.load(str(llama[0]))[0]
    prompts = prompts_of()
    sampled = [utils.generate_batch(model, prompts, 12, temp=1.0, seed=seed) for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]
    mx.random.seed(0)  # the global random state neither changes the seeded draws nor is changed by them
    assert utils.generate_batch(model, prompts, 12, temp=1.0, seed=3) == sampled[0]
    after = mx.random.uniform().item()
    mx.random.seed(0)
    assert mx.random.uniform().item() == after
    greedy = utils.generate_batch(model, prompts, 12)
    assert utils.generate_batch(model, prompts, 12, temp=1.0, top_k=1, seed=5) == greedy


def test_a_seed_per_row_gives_each_row_its_completion_whatever_the_batch(llama):
    """With a seed a prompt, a row's sampled completion is the one it gets alone (GRPO generates every group of
    a batch at once, on any number of ranks, and each completion must not depend on its batch-mates)."""
    model = utils.load(str(llama[0]))[0]
    prompts = prompts_of()
    together = utils.generate_batch(model, prompts, 12, temp=1.0, top_p=0.9, seed=list(range(10, 10 + len(prompts))))
    alone = [utils.generate_batch(model, [prompt], 12, temp=1.0, top_p=0.9, seed=[10 + k])[0]
             for k, prompt in enumerate(prompts)]
    assert together == alone
    assert len({tuple(c.tokens) for c in together}) > 1
    assert utils.generate_batch(model, prompts[:2], 12, temp=1.0, seed=[10, 12]) != together[:2]


def kept(logits, **filters):
    """The tokens whose filtered logits are finite."""
    out = utils.filtered_logits(mx.array(logits), **filters)
    return set(np.flatnonzero(np.isfinite(np.array(out))).tolist())


def test_filters_keep_the_right_tokens():
    """top-k, top-p and min-p, after the temperature (as transformers applies them), each on what the one
    before left."""
    logits = np.log([0.05, 0.6, 0.3, 0.04, 0.01]).astype(np.float32)
    assert kept(logits, temp=1.0) == {0, 1, 2, 3, 4}
    assert kept(logits, temp=1.0, top_k=2) == {1, 2}
    assert kept(logits, temp=1.0, top_k=4) == {0, 1, 2, 3}
    assert kept(logits, temp=1.0, top_p=0.8) == {1, 2}  # 0.6 + 0.3 reach 0.8
    assert kept(logits, temp=1.0, top_p=0.92) == {0, 1, 2}
    assert kept(logits, temp=1.0, min_p=0.08) == {0, 1, 2}  # at least 0.048
    assert kept(logits, temp=1.0, min_p=0.1) == {1, 2}
    assert kept(logits, temp=1.0, min_p=0.6) == {1}
    # the temperature first: at 0.25, token 2's probability is 0.0625 of token 1's
    assert kept(logits, temp=0.25, min_p=0.1) == {1}
    # top-p of what top-k left: 0.6 + 0.3 of the top 3's 0.95 reach 0.92
    assert kept(logits, temp=1.0, top_k=3, top_p=0.92) == {1, 2}
    rows = utils.filtered_logits(mx.array(np.stack([logits, logits[::-1]])), temp=1.0, top_k=1)
    assert np.isfinite(np.array(rows)).sum(axis=-1).tolist() == [1, 1]
    draws = {utils.sample(mx.array(logits), 1.0, top_k=2, key=mx.random.key(k)).item() for k in range(100)}
    assert draws == {1, 2}


def test_prompt_file_answers_each_line_and_record(chat_model, tmp_path, capsys):  # noqa: F811
    """lora.py --prompt-file: a text file's lines, or a .jsonl file's prompts and chats (other keys kept), each
    answered as generate_batch answers it, in the file's order."""
    model, tokenizer, config = utils.load(str(chat_model))
    texts = ["Q: the team", "Q: when year is 7", "Q: the team"]
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    chat = [{"role": "user", "content": "the team"}]
    records = [{"prompt": "Q: the year", "id": 1}, {"messages": chat, "id": 2}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_lora(capsys, "--model", chat_model, "--prompt-file", tmp_path / "prompts.txt", "--max-tokens", 6, "--temp", 0)
    run_lora(capsys, "--model", chat_model, "--prompt-file", tmp_path / "prompts.jsonl", "--max-tokens", 6,
             "--temp", 0, "--output", tmp_path / "chat.jsonl")
    chat_prompt = tokenizer.encode(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                                   add_special_tokens=False)
    for answers, records, prompts in [
            ("prompts.answers.jsonl", [{"prompt": t} for t in texts], [tokenizer.encode(t) for t in texts]),
            ("chat.jsonl", records, [tokenizer.encode("Q: the year"), chat_prompt])]:
        expected = utils.generate_batch(model, prompts, 6, eos_ids=lora.eos_ids(tokenizer, config))
        lines = (tmp_path / answers).read_text().splitlines()
        assert [json.loads(line) for line in lines] == [
            {**r, "answer": utils.completion_text(c, tokenizer), "finish": c.finish} for r, c in zip(records, expected)]
    greedy = (tmp_path / "prompts.answers.jsonl").read_text()
    for kept_alone in (["--top-k", 1], ["--min-p", 0.999]):  # sampling that can only pick the likeliest token
        run_lora(capsys, "--model", chat_model, "--prompt-file", tmp_path / "prompts.txt", "--max-tokens", 6,
                 "--temp", 1.0, *kept_alone, "--output", tmp_path / "sampled.jsonl")
        assert (tmp_path / "sampled.jsonl").read_text() == greedy
