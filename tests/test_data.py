"""Data formats: {"text"}, {"prompt", "completion"} and {"messages"} (with the tokenizer's chat template),
and --mask-prompt."""
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_lora, sql_texts, val_losses
from transformers import AutoTokenizer

import lora
import utils

# ChatML with tools, as Qwen2 and SmolLM2 templates render them
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "run_sql", "parameters": {"type": "object"}}}]
# the same, with TRL's markers of the assistant's tokens (transformers' assistant mask)
MARKED_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ m['content'] }}<|im_end|>\n",
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}")


def pairs(n, seed):
    return [dict(zip(("prompt", "completion"), t.split("A: ", 1))) for t in sql_texts(n, seed)]


def chats(n, seed):
    return [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}],
             **({"tools": TOOLS} if i % 2 else {})} for i, p in enumerate(pairs(n, seed))]


@pytest.fixture(scope="module")
def chat_model(tiny_llama, tmp_path_factory):
    """The tiny model with a chat template in its tokenizer."""
    folder = tmp_path_factory.mktemp("chat_model")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def write(folder, name, examples):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))


def test_chats_render_as_transformers_does(chat_model):
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    for example in chats(4, 0):
        tokens, [(prompt, end)] = lora.encode(example, tokenizer, add_eos=True)
        expected = tokenizer.apply_chat_template(example["messages"], tools=example.get("tools"), tokenize=True)
        assert tokens == list(getattr(expected, "input_ids", expected))
        head = tokenizer.apply_chat_template(example["messages"][:1], tools=example.get("tools"), tokenize=True,
                                             add_generation_prompt=True)
        assert prompt == len(getattr(head, "input_ids", head)) and tokens[:prompt] == list(getattr(head, "input_ids", head))
        assert end == len(tokens)
        assert ("run_sql" in tokenizer.decode(tokens)) == ("tools" in example)


def test_masked_prompt_tokens_carry_no_loss(tiny_llama):
    model, tokenizer, _ = utils.load(str(tiny_llama))
    examples = pairs(4, 0)
    masked = lora.tokenize(examples, tokenizer, True, 256, "test", mask_prompt=True)
    whole = lora.tokenize(examples, tokenizer, True, 256, "test")
    for (tokens, start), example, (same, zero) in zip(masked, examples, whole):
        assert tokens == same and zero == 0
        assert start == len(tokenizer.encode(example["prompt"])) - 1  # the target of that input is the completion's first
    inputs, targets, mask, _ = next(lora.iterate_batches(masked, 4))
    loss, ntoks = lora.loss_fn(model, inputs, targets, mask)
    assert ntoks.item() == sum(len(t) - 1 - s for t, s in masked)
    rng = np.random.default_rng(0)
    changed = np.array(targets)
    starts = [start for _, start in masked]
    for row, start in enumerate(starts):
        changed[row, :start] = rng.integers(3, 300, start)  # other prompt targets: the same loss
    assert lora.loss_fn(model, inputs, mx.array(changed), mask)[0].item() == loss.item()
    changed[0, starts[0]] = (changed[0, starts[0]] + 1) % 300  # another completion target: another loss
    assert lora.loss_fn(model, inputs, mx.array(changed), mask)[0].item() != loss.item()


def message(role, content):
    return {"role": role, "content": content}


# chats that end in an assistant message or not, with one assistant message or several
MASKED_CHATS = [
    [message("user", "the team when year is 4"), message("assistant", "SELECT team FROM t")],
    [message("system", "be brief"), message("user", "the year"), message("assistant", "SELECT year"),
     message("user", "and the city?")],
    [message("user", "the name"), message("assistant", "SELECT name"), message("user", "the city"),
     message("assistant", "SELECT city WHERE year = 3"), message("system", "end")],
    [message("user", "a"), message("assistant", "SELECT a"), message("assistant", "SELECT b"), message("user", "c")],
]


def test_mask_prompt_scores_the_assistant_messages_alone(chat_model):
    """--mask-prompt scores each assistant message of a chat and nothing else, whatever message comes last: the
    tokens of transformers' assistant mask (TRL's assistant_only_loss) under the template with markers, which the
    template without them gives alike."""
    tokenizer, marked = AutoTokenizer.from_pretrained(chat_model), AutoTokenizer.from_pretrained(chat_model)
    marked.chat_template = MARKED_TEMPLATE
    examples = [{"messages": m} for m in MASKED_CHATS]
    for template in (tokenizer, marked):
        rows = lora.tokenize(examples, template, True, 256, "train", mask_prompt=True)
        for row, example in zip(rows, examples):
            assert_scores_the_assistant_mask(row, marked, example["messages"])


def assert_scores_the_assistant_mask(row, marked, messages, tools=None):
    """The row (tokens, scored) scores the tokens that transformers' assistant mask marks, with the template of
    `marked`; the tokens are the chat's, those after the last marked one left out."""
    tokens, scored = row
    expected = marked.apply_chat_template(messages, tools=tools, return_dict=True, return_assistant_tokens_mask=True)
    mask = np.array(expected["assistant_masks"])
    assert tokens == expected["input_ids"][:len(tokens)] and not mask[len(tokens):].any()
    assert (lora.scored_targets(tokens, scored) == mask[1:len(tokens)]).all()  # a target is the next token


def test_a_chat_prompt_and_its_completion_are_one_chat(chat_model):
    """{"prompt": messages, "completion": [an assistant message]} is the chat of both, with --mask-prompt too."""
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    prompt, completion = MASKED_CHATS[0][:-1], MASKED_CHATS[0][-1:]
    assert completion[0]["role"] == "assistant"
    for mask_prompt in (False, True):
        assert (lora.tokenize([{"prompt": prompt, "completion": completion}], tokenizer, True, 256, "train",
                              mask_prompt=mask_prompt) ==
                lora.tokenize([{"messages": prompt + completion}], tokenizer, True, 256, "train",
                              mask_prompt=mask_prompt))


def test_mask_prompt_refuses_what_it_cannot_mask(chat_model, tmp_path, capsys):
    """A chat without an assistant message is refused. A template that renders a chat's first messages otherwise
    than the whole chat (as Qwen3's drops earlier reasoning) leaves those earlier assistant messages unscored, with
    a warning, and is refused where the last one's tokens are not where they seem."""
    chat = [message("user", "q"), message("assistant", "SELECT a")]
    write(tmp_path, "train", [{"messages": chat}, {"messages": [message("system", "s"), message("user", "q")]}])
    with pytest.raises(utils.UserError, match=r"train.jsonl:2: no assistant message, and --mask-prompt trains on "):
        lora.load_dataset(tmp_path, "train", mask_prompt=True)
    assert len(lora.load_dataset(tmp_path, "train")) == 2  # without --mask-prompt, every token trains
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    think = "{% if loop.last and m['role'] == 'assistant' %}<think>{% endif %}{{ m['content'] }}"
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{{ m['content'] }}", think)
    write(tmp_path, "train", [{"messages": chat}, {"messages": chat + chat}])
    examples = lora.load_dataset(tmp_path, "train", mask_prompt=True)
    single, = lora.tokenize(examples[:1], tokenizer, True, 256, "train", mask_prompt=True)
    assert "[WARNING]" not in capsys.readouterr().out
    row, = lora.tokenize(examples[1:], tokenizer, True, 256, "train", mask_prompt=True)
    assert "--mask-prompt: in 1 train chats the chat template renders an earlier" in capsys.readouterr().out
    scored = lora.scored_targets(*row)
    assert scored[-1] and scored.sum() == lora.scored_targets(*single).sum()  # the last assistant message alone
    tokenizer.chat_template = MARKED_TEMPLATE.replace("{{ m['content'] }}", think)  # its markers tell
    row, = lora.tokenize(examples[1:], tokenizer, True, 256, "train", mask_prompt=True)
    assert_scores_the_assistant_mask(row, tokenizer, chat + chat)
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{{ m['content'] }}", "{% if loop.last %}<think>{% endif %}"
                                                    "{{ m['content'] }}")
    with pytest.raises(utils.UserError, match=r"train.jsonl:1: the chat template of .* renders the messages up to "
                                              r"the assistant's message 2 otherwise than within the whole chat"):
        lora.tokenize(examples, tokenizer, True, 256, "train", mask_prompt=True)


def tool_template(marked):
    """ChatML whose assistant messages may call tools (as Qwen2.5's), with TRL's markers of the assistant's tokens
    if `marked`."""
    body = ("{% if m.content %}{{ m.content }}{% endif %}{% for call in m.tool_calls or [] %}<tool_call>"
            "{{ call.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n")
    if marked:
        body = ("{% if m['role'] == 'assistant' %}{% generation %}" + body + "{% endgeneration %}{% else %}" + body
                + "{% endif %}")
    return ("{% if tools %}<|im_start|>system\nYou may call: {{ tools | tojson }}<|im_end|>\n{% endif %}"
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n" + body + "{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def function(name, **fields):
    return {"type": "function", "function": {"name": name, **fields}}


# mlx-lm's tools format: chats whose assistant messages call tools (without content, or with), of tools whose
# definitions, calls and messages have other fields each (which a table gives all of them, null where absent)
TOOL_CHATS = [
    {"messages": [message("user", "the team when year is 4"),
                  {"role": "assistant", "tool_calls": [function("run_sql", arguments={"query": "SELECT team"})]},
                  message("tool", "Lions"), message("assistant", "The Lions.")],
     "tools": [function("run_sql", parameters={"type": "object", "properties": {"query": {"type": "string"}}})]},
    {"messages": [message("user", "the year"),
                  {"role": "assistant", "content": "Looking.",
                   "tool_calls": [function("lookup", arguments={"table": "t", "limit": 1})]},
                  message("tool", "4"), message("assistant", "4."), message("user", "thanks")],
     "tools": [function("lookup", description="reads a table", parameters={"type": "object"})]},
]


def test_tool_calls_are_scored_with_every_assistant_message(chat_model, tmp_path):
    """Chats with tools (mlx-lm's format), read from a .jsonl file or a parquet file, render as the chat template
    renders them; --mask-prompt scores each assistant message, tool calls and all, and nothing else: the tokens
    of transformers' assistant mask, with the template with markers and without."""
    import datasets

    tokenizer, marked = AutoTokenizer.from_pretrained(chat_model), AutoTokenizer.from_pretrained(chat_model)
    tokenizer.chat_template, marked.chat_template = tool_template(False), tool_template(True)
    write(tmp_path / "jsonl", "train", TOOL_CHATS)
    datasets.Dataset.from_list(TOOL_CHATS).to_parquet(tmp_path / "chats.parquet")
    for data in (tmp_path / "jsonl", tmp_path / "chats.parquet"):
        examples = lora.load_dataset(data, "train", mask_prompt=True)
        assert examples == TOOL_CHATS
        for template in (tokenizer, marked):
            rows = lora.tokenize(examples, template, True, 2048, "train", mask_prompt=True)
            for row, example in zip(rows, examples):  # (a table orders a struct's keys its own way)
                assert_scores_the_assistant_mask(row, marked, example["messages"], example["tools"])
                text = tokenizer.decode(row[0])
                assert "<tool_call>" in text and example["tools"][0]["function"]["name"] in text


def test_a_hugging_face_dataset_is_read_as_its_records(tiny_llama, tmp_path, capsys):
    """--data reads parquet, CSV and JSON lines files with datasets: a folder of them (its splits by the files'
    names) or one (a train split alone: the others are slices of it); its columns are the formats' keys that the
    --*-feature flags map them to (in .jsonl files too), and a row is checked as a line is."""
    import datasets

    rows = [{"question": p["prompt"], "answer": p["completion"], "id": i} for i, p in enumerate(pairs(8, 0))]
    expected = [{"prompt": r["question"], "completion": r["answer"]} for r in rows]
    table = datasets.Dataset.from_list(rows)
    folder = tmp_path / "parquet"
    folder.mkdir()
    table.to_parquet(folder / "train.parquet")
    table.select(range(4)).to_parquet(folder / "validation.parquet")
    table.to_csv(tmp_path / "qa.csv", index=False)
    table.to_json(tmp_path / "qa.jsonl")
    write(tmp_path / "jsonl", "train", rows)
    columns = {"prompt": "question", "completion": "answer"}
    for data in (folder, tmp_path / "qa.csv", tmp_path / "qa.jsonl", tmp_path / "jsonl"):
        examples = lora.load_dataset(data, "train", columns=columns)
        assert examples == expected
    assert examples.where(2) == f"{tmp_path / 'jsonl' / 'train.jsonl'}:3"
    assert lora.load_dataset(folder, "train", columns=columns).where(2) == f"{folder} (split train) row 2"
    assert lora.load_dataset(folder, "valid", columns=columns) == expected[:4]
    hub = tmp_path / "hub"  # splits named in its README, as mlx-lm's datasets on the hub name them: "valid"
    hub.mkdir()
    table.to_parquet(hub / "a.parquet")
    table.select(range(2)).to_parquet(hub / "b.parquet")
    (hub / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                   "    path: a.parquet\n  - split: valid\n    path: b.parquet\n---\n")
    assert lora.load_dataset(hub, "valid", columns=columns) == expected[:2]
    with pytest.raises(utils.UserError, match=r"^--valid-split: .*qa.csv has no split validation or valid \("):
        lora.load_dataset(tmp_path / "qa.csv", "valid", columns=columns)
    valid = lora.load_dataset(tmp_path / "qa.csv", "valid", columns=columns, dataset_splits={"valid": "train[-3:]"})
    assert valid == expected[-3:]
    with pytest.raises(utils.UserError, match=r"^--train-split: chooses a split of a Hugging Face dataset"):
        lora.load_dataset(tmp_path / "jsonl", "train", dataset_splits={"train": "train[:2]"})
    with pytest.raises(utils.UserError, match=r"^--text-feature body: no row of .*qa.csv \(split train\) has that "):
        lora.load_dataset(tmp_path / "qa.csv", "train", columns={**columns, "text": "body"})

    # a chat from a pair's chosen column: the pair's other columns are no format's keys then
    chat = [message("user", "q"), message("assistant", "a")]
    write(tmp_path / "pairs", "train", [{"prompt": chat[:1], "chosen": chat[1:], "rejected": chat[1:], "messages": chat,
                                         "text": "t"}])
    assert lora.load_dataset(tmp_path / "pairs", "train", columns={"messages": "rejected"}) == [{"messages": chat[1:]}]

    bad = rows[:3] + [{"question": "q", "answer": None, "id": 3}]
    datasets.Dataset.from_list(bad).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(utils.UserError, match=r"a.parquet \(split train\) row 3: not an example: .* \(--prompt-feature "
                                              r"question\) \(--completion-feature answer\)$"):
        lora.load_dataset(tmp_path / "a.parquet", "train", columns=columns)

    out = run_lora(capsys, "--model", tiny_llama, "--data", folder, "--prompt-feature", "question",
                   "--completion-feature", "answer", "--train", "--mask-prompt", "--iters", 2, "--batch-size", 4,
                   "--lora-layers", 1, "--eval-on-start", "--steps-per-eval", 2, "--val-batches", 1,
                   "--adapter-file", tmp_path / "a.safetensors")
    assert "Iter 2: Val loss" in out


@pytest.mark.parametrize("record", [
    {"text": "a", "messages": [message("user", "q"), message("assistant", "a")]},
    {"prompt": "q", "completion": "a", "text": "q a"},
    {"prompt": "q", "completion": "a", "chosen": "a", "rejected": "b"},
    {"messages": [message("user", "q"), message("assistant", "a")], "chosen": "a"},
    {"prompt": "q", "completion": "a", "messages": [message("user", "q"), message("assistant", "a")]},
    {"text": 5, "prompt": "q", "completion": "a"},
])
def test_a_record_of_two_formats_is_refused(tmp_path, record):
    write(tmp_path, "train", [{"text": "a"}, record])
    keys = ", ".join(sorted(k for k in record if k in {k for keys in lora.FORMAT_KEYS.values() for k in keys}))
    with pytest.raises(utils.UserError, match=rf"train.jsonl:2: holds the keys of more than one format \({keys}\)"):
        lora.load_dataset(tmp_path, "train")


def test_null_keys_are_absent_to_the_check_and_the_training(tiny_llama, tmp_path):
    """A table exported to JSON writes the columns that a row lacks as null: such keys are no format's."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)  # no chat template: a chat could not be tokenized
    write(tmp_path, "train", [{"text": "Q: a\nA: b", "messages": None, "prompt": None}])
    examples = lora.load_dataset(tmp_path, "train")
    assert examples == [{"text": "Q: a\nA: b"}]
    assert lora.tokenize(examples, tokenizer, True, 256, "train")[0][0] == tokenizer.encode("Q: a\nA: b") + [2]


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_training_on_completions_lowers_their_loss(kind, chat_model, tmp_path, capsys):
    data = tmp_path / "data"
    make = pairs if kind == "completion" else chats
    for split, n, seed in [("train", 64, 1), ("valid", 16, 2)]:
        write(data, split, make(n, seed))
    out = run_lora(capsys, "--model", chat_model, "--data", data, "--train", "--mask-prompt", "--iters", 30,
                   "--learning-rate", 1e-2, "--lora-layers", -1, "--lora-alpha", 16, "--lora-rank", 4,
                   "--eval-on-start", "--steps-per-eval", 30, "--val-batches", -1, "--adapter-file",
                   tmp_path / "a.safetensors")
    losses = val_losses(out)
    assert losses[30] < losses[1] - 0.5, out


def test_format_errors(tiny_llama, tmp_path, capsys):
    data = tmp_path / "data"
    write(data, "test", [{"text": t} for t in sql_texts(4)])
    with pytest.raises(utils.UserError, match=r"--mask-prompt: .*test.jsonl holds plain text examples"):
        run_lora(capsys, "--model", tiny_llama, "--data", data, "--test", "--mask-prompt")
    write(data, "test", chats(4, 0))
    with pytest.raises(utils.UserError, match=r"test.jsonl: chat examples, and the tokenizer of .* has no chat template"):
        run_lora(capsys, "--model", tiny_llama, "--data", data, "--test")


@pytest.mark.parametrize("kind", ["text", "completion", "chat"])
def test_generate_eval_counts_exact_completions(kind, chat_model, tmp_path, capsys):
    """Expected completions are what the trained model generates itself (to its end of sequence) for half of
    the test prompts, and something else for the other half: the accuracy must be one half."""
    if kind == "chat":  # turns that end in the end-of-sequence token, which a tiny model learns fast
        chat_model = shutil.copytree(chat_model, tmp_path / "model")
        tokenizer = AutoTokenizer.from_pretrained(chat_model)
        tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
                                   "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
        tokenizer.save_pretrained(chat_model)
    data = tmp_path / "data"
    make = {"text": lambda n, seed: [{"text": t} for t in sql_texts(n, seed)], "completion": pairs, "chat": chats}[kind]
    for split, n, seed in [("train", 64, 1), ("valid", 4, 2)]:
        write(data, split, make(n, seed))
    adapters = tmp_path / "a.safetensors"
    run_lora(capsys, "--model", chat_model, "--data", data, "--train", "--iters", 200 if kind == "chat" else 100, "--learning-rate", 3e-3,
             "--fine-tune-type", "full", "--lora-layers", -1, "--eval-on-start", "--steps-per-eval", 100,
             "--val-batches", 1,
             "--adapter-file", adapters)
    model, tokenizer, config = utils.load(str(chat_model))
    utils.load_adapters(model, adapters)
    tests = []
    for i, pair in enumerate(pairs(8, 3)):
        record = {"messages": [{"role": "user", "content": pair["prompt"]}]} if kind == "chat" else pair
        if kind == "chat":
            prompt = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=True)
            prompt = list(getattr(prompt, "input_ids", prompt))
        else:
            prompt = tokenizer.encode(pair["prompt"] + ("A:" if kind == "text" else ""))
        generated = tokenizer.decode(utils.generate_batch(model, [prompt], 40)[0].tokens)
        assert tokenizer.eos_token in generated, generated  # trained: it ends its answers
        completion = generated.split(tokenizer.eos_token)[0] + ("" if i % 2 else " WHERE")
        tests.append({"text": pair["prompt"] + "A:" + completion} if kind == "text" else
                     {"prompt": pair["prompt"], "completion": completion} if kind == "completion" else
                     {"messages": record["messages"] + [{"role": "assistant", "content": completion}]})
    write(data, "test", tests)
    marker = ["--completion-marker", "A: "] if kind == "text" else []
    out = run_lora(capsys, "--model", chat_model, "--data", data, "--adapter-file", adapters, "--test",
                   "--generate-eval", 8, *marker)
    assert "Test exact match 4/8 (50.0%)" in out, out

    if kind == "text":
        with pytest.raises(utils.UserError, match="give --completion-marker"):
            run_lora(capsys, "--model", chat_model, "--data", data, "--test", "--generate-eval", 2)
        with pytest.raises(utils.UserError, match=r"--completion-marker 'B:': not in .*test.jsonl:1$"):
            run_lora(capsys, "--model", chat_model, "--data", data, "--test", "--generate-eval", 2,
                     "--completion-marker", "B:")
