"""GRPO (--train-mode grpo): the advantages, loss and metrics of given completions against TRL's GRPOTrainer's
own code, the prompts' rows, and training that raises a reward a tiny model can learn."""
import json
import re
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from conftest import ALL_TARGETS, copy_of, random_adapter, run_fuse, run_lora, sql_texts
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import lora
import utils

GENERATIONS, LONGEST, EOS = 3, 6, 2

# reward functions as a user writes them for TRL, of the token ids so that the test picks what they give: the
# second leaves a completion unscored (None), and reads the data's `answer` column
REWARDS = '''
def by_length(completions, completion_ids, **kwargs):
    return [float(len(ids) % 3) for ids in completion_ids]


def by_first_token(prompts, completions, completion_ids, answer, **kwargs):
    return [None if ids[0] % 5 == 0 else float(ids[0] % 4) + (answer[k] == "a") for k, ids in enumerate(completion_ids)]
'''


def prompt_records(n):
    return [{"prompt": text.split("A: ")[0] + "A:", "answer": "ab"[k % 2]} for k, text in enumerate(sql_texts(n))]


def given_completions(prompts):
    """GENERATIONS completions of each prompt (as utils.generate_batch gives them): token ids past the special
    ones, up to LONGEST, those shorter ending in EOS, the others cut at LONGEST (truncated). The first prompt's
    all get one reward (their lengths and first tokens alike), the second's first none."""
    rng = np.random.default_rng(0)
    completions = {}
    for k, prompt in enumerate(prompts):
        group = []
        for g in range(GENERATIONS):
            length = LONGEST - 1 if k == 0 else int(rng.integers(2, LONGEST + 1))
            tokens = rng.integers(3, 300, length).tolist()
            if length < LONGEST or rng.random() < 0.3:
                tokens[-1] = EOS
            tokens[0] = 7 if k == 0 else 5 if k == 1 and g == 0 else tokens[0]
            group.append(SimpleNamespace(tokens=tokens, finish="eos" if tokens[-1] == EOS else "length"))
        completions[tuple(prompt)] = group
    return completions


@pytest.fixture(scope="module")
def adapted(make_checkpoint, tmp_path_factory):
    """A tiny model with random LoRA adapters, and a maker of the same as a PEFT model in PyTorch (TRL adds its
    reference's adapters to the one it is given); its tokenizer; a file of reward functions."""
    folder, reference = make_checkpoint("llama")
    tmp = tmp_path_factory.mktemp("grpo")
    mx.random.seed(0)
    model = random_adapter(folder, tmp / "adapters.safetensors", rank=4, scale=2.0)
    run_fuse("--model", folder, "--adapter-file", tmp / "adapters.safetensors", "--export-peft", tmp / "peft")
    from peft import PeftModel

    (tmp / "test_rewards.py").write_text(REWARDS)
    return (model, lambda: PeftModel.from_pretrained(copy_of(reference), tmp / "peft").eval(),
            utils.load(str(folder))[1], tmp / "test_rewards.py")


@pytest.mark.parametrize("loss_type, beta, scale_rewards, iterations, masked", [
    ("dapo", 0.0, "group", 1, False), ("grpo", 0.05, "batch", 2, True), ("dr_grpo", 0.05, "none", 2, False),
    ("bnpo", 0.0, "group", 2, True)])
def test_grpo_advantages_loss_and_metrics_equal_trls_grpo_trainer(adapted, tmp_path, monkeypatch, loss_type, beta,
                                                                  scale_rewards, iterations, masked):
    """TRL's GRPOTrainer on the PEFT model, its completions given (rollout_func) as ours are (generate_batch):
    its _generate_and_score_completions (rewards, advantages, the old and reference log-probabilities) and
    _compute_loss, against our rollout and loss. The reference is the adapters as training started (TRL's copy
    of them, ours as prepare() took them), the policy those adapters since moved (scaled); with several
    iterations, the old log-probabilities moved on both sides, so that some ratios are clipped."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, make_peft_model, tokenizer, rewards_file = adapted
    records = prompt_records(3)
    flags = dict(num_generations=GENERATIONS, max_completion_length=LONGEST, mask_truncated_completions=masked,
                 scale_rewards=scale_rewards, loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28,
                 num_iterations=iterations)
    objective = lora.GRPO(reward_functions=f"{rewards_file}:by_length,by_first_token", reward_weights=[1.0, 0.5],
                          temp=0.7, batch_size=len(records) * GENERATIONS, **flags)
    rows = lora.tokenize(records, tokenizer, True, 256, "train", objective=objective)
    completions = given_completions([tokens for tokens, _ in rows])
    monkeypatch.setattr(utils, "generate_batch", lambda model, prompts, *args, **kwargs: [
        completion for prompt in prompts[::GENERATIONS] for completion in completions[tuple(prompt)]])
    ordered = [completion for tokens, _ in rows for completion in completions[tuple(tokens)]]
    given = objective.prepare(model, [rows])[0]
    adapters = tree_flatten(model.trainable_parameters())
    model.update(tree_map(lambda weights: 1.5 * weights, model.trainable_parameters()))
    try:
        prompts = next(lora.iterate_batches(rows, len(records), objective=objective, given=given))
        batch = objective.rollout(model, prompts, objective.completions(model, [prompts])[0], 0.0, iterations > 1, None)
        width, longest = batch.sequences.rows.targets.shape[1], max(len(c.tokens) for c in ordered)
        shift, trl_shift = np.zeros(batch.sequences.rows.targets.size, np.float32), np.zeros((len(ordered), longest))
        for r, completion in enumerate(ordered):
            start = len(rows[r // GENERATIONS][0]) - 1
            for j in range(len(completion.tokens)):
                shift[r * width + start + j] = trl_shift[r, j] = 0.3 * np.sin(1 + r * LONGEST + j)
        if iterations > 1:
            batch = batch._replace(old=batch.old + mx.array(shift))
        loss, count, sums = objective.loss(model, batch)
    finally:
        model.update(tree_unflatten(adapters))
    metrics = objective.metric_values(sums.tolist(), count.item())

    def rollout(prompts, trainer):
        return {"prompt_ids": [tokens for tokens, _ in rows for _ in range(GENERATIONS)],
                "completion_ids": [c.tokens for c in ordered], "logprobs": None}

    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    config = GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, temperature=0.7,
                        per_device_train_batch_size=len(ordered), per_device_eval_batch_size=len(ordered),
                        reward_weights=[1.0, 0.5], **flags)
    peft_model = make_peft_model()
    trainer = GRPOTrainer(peft_model, reward_funcs=objective.functions, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(records), rollout_func=rollout)
    peft_model.eval()
    with torch.no_grad():  # the trained adapters moved as ours, past TRL's copy of them (its reference)
        for name, weights in peft_model.named_parameters():
            if ".default." in name:
                weights.mul_(1.5)
    with torch.no_grad():
        scored = trainer._generate_and_score_completions([r for r in records for _ in range(GENERATIONS)])
        if iterations > 1:
            scored["old_per_token_logps"] += torch.tensor(trl_shift, dtype=torch.float32)
        expected = trainer._compute_loss(peft_model, scored).item()
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert np.allclose(np.array(batch.advantages), scored["advantages"].numpy(), atol=1e-5)
    assert abs(loss.item() - expected) < 1e-5
    for name in objective.metrics:
        if not name.startswith("seconds/"):
            assert abs(metrics[name] - logged[name]) < 1e-5 * max(1, abs(logged[name])), name
    assert (logged["frac_reward_zero_std"] > 0) == (scale_rewards != "batch")  # (a group of one reward)
    assert logged["completions/clipped_ratio"] > 0
    assert (logged["clip_ratio/region_mean"] > 0) == (iterations > 1) and (beta == 0 or logged["kl"] > 1e-4)


def test_grpo_rows_are_the_prompts_and_their_records(adapted, tmp_path):
    """A prompt's row is its tokens (a chat's rendered with the generation prompt), its example's record
    carried to the reward functions; one that leaves less than --max-completion-length of --max-seq-length is
    an error naming it."""
    _, _, tokenizer, rewards_file = adapted
    objective = lora.GRPO(reward_functions=f"{rewards_file}:by_length", num_generations=2, batch_size=4,
                          max_completion_length=10)
    records = prompt_records(2)
    rows = lora.tokenize(records, tokenizer, True, 256, "train", objective=objective)
    assert [tokens for tokens, _ in rows] == [tokenizer.encode(r["prompt"]) for r in records]
    assert list(rows.labels) == records
    with pytest.raises(utils.UserError, match=r"example 2: its prompt is \d+ tokens, which with "
                                              r"--max-completion-length 10 pass --max-seq-length 20"):
        lora.tokenize([{"prompt": "Q"}, {"prompt": "Q " * 20}], tokenizer, True, 20, "train", objective=objective)


def learnable_rewards(folder):
    """A reward that a tiny model learns in a few steps: the share of a completion's tokens in the lower half
    of the vocabulary (its output layer's random directions let it rise from a half to about two thirds)."""
    path = folder / "low_ids.py"
    path.write_text("def low_ids(completion_ids, **kwargs):\n"
                    "    return [sum(i < 150 for i in ids) / len(ids) for ids in completion_ids]\n")
    return f"{path}:low_ids"


def write_prompts(folder, sizes=(("train", 32), ("valid", 8))):
    folder.mkdir(exist_ok=True)
    for split, n in sizes:
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_records(n)))
    return folder


@pytest.mark.skipif(not hasattr(utils, "generate_batch"), reason="needs utils.generate_batch")
def test_grpo_training_raises_a_reward_the_model_can_learn(tiny_llama, tmp_path, capsys, monkeypatch):
    """On a reward the tiny model can learn, the training reward rises; the log and metrics.jsonl carry TRL's
    metrics, validation too, and the run folder a few completions with their rewards."""
    monkeypatch.chdir(tmp_path)
    out = run_lora(capsys, "--model", tiny_llama, "--data", write_prompts(tmp_path / "prompts"), "--train",
                   "--train-mode", "grpo", "--reward-functions", learnable_rewards(tmp_path), "--num-generations", 4,
                   "--batch-size", 16, "--max-completion-length", 8, "--max-seq-length", 64, "--iters", 45,
                   "--learning-rate", 2e-2, "--lora-layers", 4, "--lora-targets", *ALL_TARGETS,
                   "--steps-per-report", 5, "--eval-on-start", "--steps-per-eval", 45, "--val-batches", 1, "--temp",
                   1.0)
    records = [json.loads(line) for line in (tmp_path / "runs" / "1" / "metrics.jsonl").read_text().splitlines()]
    reports = [r for r in records if "train_loss" in r]
    rewards = [r["reward"] for r in reports]
    # (a tiny random model's final norm caps the share: about 0.65)
    assert np.mean(rewards[-2:]) > np.mean(rewards[:2]) + 0.04, rewards
    assert {"reward_std", "rewards/low_ids/mean", "frac_reward_zero_std", "completions/mean_length",
            "completions/clipped_ratio", "entropy", "clip_ratio/region_mean", "seconds/generation"} <= set(reports[0])
    assert "val_reward" in records[-1] and "reward" in out
    samples = [json.loads(line) for line in (tmp_path / "runs" / "1" / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 45 * 4 and {"prompt", "completion", "reward", "advantage"} <= set(samples[0])


GRPO_RUN = ["--train-mode", "grpo", "--num-generations", 2, "--batch-size", 4, "--max-completion-length", 6,
            "--max-seq-length", 64, "--lora-layers", 2, "--lora-rank", 4, "--val-batches", 0]


def test_packed_completions_give_the_loss_and_gradient_of_padded_ones(adapted, monkeypatch):
    """--pack lays a batch's completions (prompt and completion each) in one row, attention kept within each:
    GRPO's loss, its gradient and its metrics are those of the padded rows."""
    model, _, tokenizer, rewards_file = adapted
    records = prompt_records(3)
    objective = lora.GRPO(reward_functions=f"{rewards_file}:by_length,by_first_token", num_generations=GENERATIONS,
                          max_completion_length=LONGEST, beta=0.0, batch_size=len(records) * GENERATIONS)
    rows = lora.tokenize(records, tokenizer, True, 256, "train", objective=objective)
    completions = given_completions([tokens for tokens, _ in rows])
    monkeypatch.setattr(utils, "generate_batch", lambda model, prompts, *args, **kwargs: [
        completion for prompt in prompts[::GENERATIONS] for completion in completions[tuple(prompt)]])
    given = objective.prepare(model, [rows])[0]
    results = []
    for pack in (False, True):
        prompts = next(lora.iterate_batches(rows, len(records), objective=objective, given=given, pack=pack))
        batch = objective.rollout(model, prompts, objective.completions(model, [prompts])[0], 0.0, False, None)
        assert (batch.sequences.rows.packing is not None) == pack
        (loss, _, sums), grads = nn.value_and_grad(model, objective.loss)(model, batch)
        results.append((loss.item(), np.array(sums), tree_flatten(grads)))
    (loss, sums, grads), (packed_loss, packed_sums, packed_grads) = results
    # (the sums' last three are the seconds of generation, rewards and the passes without a gradient)
    assert packed_loss == pytest.approx(loss, abs=1e-5) and np.allclose(packed_sums[:-3], sums[:-3], atol=1e-4)
    assert all(np.allclose(np.array(g), np.array(p), atol=1e-5) for (_, g), (_, p) in zip(grads, packed_grads))


def test_a_step_generates_its_accumulated_batches_in_one_call(tiny_llama, tmp_path, capsys, monkeypatch):
    """With --grad-accumulation-steps, the completions of a step's batches are generated together (TRL's
    steps_per_generation), and each batch is trained on its own completions."""
    calls, generate = [], utils.generate_batch

    def counted(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(utils, "generate_batch", counted)
    monkeypatch.chdir(tmp_path)
    run_lora(capsys, "--model", tiny_llama, "--data", write_prompts(tmp_path / "prompts", (("train", 8),)), "--train",
             "--reward-functions", learnable_rewards(tmp_path), *GRPO_RUN, "--grad-accumulation-steps", 3,
             "--iters", 2, "--learning-rate", 1e-2)
    assert calls == [12, 12]  # and none to check the adapters before they are saved (their prompts' loss does)
    samples = [json.loads(line) for line in (tmp_path / "runs" / "1" / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 3 * 2 and len({s["prompt"] for s in samples[:6:2]}) == 3


@pytest.mark.skipif(not hasattr(utils, "generate_batch"), reason="needs utils.generate_batch")
def test_grpo_resumes_exactly(tiny_llama, tmp_path, capsys):
    """A run resumed from its checkpoint ends where the whole run does: the same prompts and completions (their
    sampler's seed from --seed and the iteration), the same reference (the adapters as the run started) and old
    log-probabilities (at a multiple of --num-iterations)."""
    flags = ["--model", tiny_llama, "--data", write_prompts(tmp_path / "prompts", (("train", 8),)), "--train",
             "--reward-functions", learnable_rewards(tmp_path), *GRPO_RUN, "--beta", 0.1, "--num-iterations", 2,
             "--iters", 4, "--save-every", 2, "--learning-rate", 1e-2]
    run_lora(capsys, *flags, "--adapter-file", tmp_path / "whole" / "adapters.safetensors")
    checkpoint = tmp_path / "whole" / "runs" / "1" / "step-0000002"
    run_lora(capsys, *flags, "--adapter-file", tmp_path / "resumed" / "adapters.safetensors", "--resume", checkpoint)
    whole, resumed = (mx.load(str(tmp_path / name / "adapters.safetensors")) for name in ("whole", "resumed"))
    assert all(np.array_equal(np.array(whole[k]), np.array(resumed[k])) for k in whole)


@pytest.mark.skipif(not hasattr(utils, "generate_batch"), reason="needs utils.generate_batch")
@pytest.mark.parametrize("kind", ["dora", "full", "qlora"])
def test_grpo_trains_dora_full_and_qlora(kind, tiny_llama, tmp_path, capsys):
    """DoRA, full fine-tuning and QLoRA train (the loss and adapters finite, the weights moved), with the KL
    term's reference (the starting weights swapped in)."""
    model = tiny_llama
    if kind == "qlora":
        import convert

        convert.convert(convert.build_parser().parse_args(["--hf-path", str(tiny_llama), "--mlx-path",
                                                           str(tmp_path / "q"), "-q", "--q-group-size", "32"]))
        model = tmp_path / "q"
    out = run_lora(capsys, "--model", model, "--data", write_prompts(tmp_path / "prompts", (("train", 8),)),
                   "--train", "--reward-functions", learnable_rewards(tmp_path), *GRPO_RUN, "--beta", 0.1,
                   "--iters", 2, "--steps-per-report", 1, "--learning-rate", 1e-2, "--adapter-file",
                   tmp_path / "adapters.safetensors", *({"dora": ["--fine-tune-type", "dora"],
                                                        "full": ["--fine-tune-type", "full"]}.get(kind, [])))
    record = json.loads((tmp_path / "runs" / "1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["train_loss"]) and record["kl"] > 0, out


@pytest.mark.skipif(not hasattr(utils, "generate_batch"), reason="needs utils.generate_batch")
def test_grpo_says_when_no_group_has_a_reward_spread(tiny_llama, tmp_path, capsys):
    """A reward that gives every completion of a group the same: nothing trains, and the log says so."""
    (tmp_path / "constant.py").write_text("def constant(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    out = run_lora(capsys, "--model", tiny_llama, "--data", write_prompts(tmp_path / "prompts", (("train", 8),)),
                   "--train", "--reward-functions", f"{tmp_path / 'constant.py'}:constant", *GRPO_RUN, "--iters", 2,
                   "--steps-per-report", 1, "--adapter-file", tmp_path / "adapters.safetensors")
    assert out.count("[WARNING] every group's completions since the last report got the same reward") == 2


def test_ready_reward_functions_read_the_answer_after_the_marker():
    """rewards.py: the first line after the last "Answer:" (or of the whole completion), text or a chat's
    message, against the answer column; its shape as a query."""
    import rewards

    sql = "SELECT Line FROM 1-7100412-3 WHERE Station = 'Old Mill'"
    completions = [f" {sql}\nQ: the next question", f"Answer: no\nSo, Answer: {sql}", "SELECT Line", f"{sql}.",
                   [{"role": "assistant", "content": f"Answer: {sql}"}]]
    assert rewards.exact_answer(completions, answer=[sql] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert rewards.sql_format(completions) == [1.0, 1.0, 0.0, 1.0, 1.0]


@pytest.mark.skipif(not hasattr(utils, "generate_batch"), reason="needs utils.generate_batch")
def test_grpo_test_reports_each_reward_functions_mean(tiny_llama, tmp_path, capsys):
    """--test of GRPO prompts samples their completions and reports the reward, each function's mean (the reward
    their weighted sum) and the completions' lengths."""
    functions = learnable_rewards(tmp_path)
    with open(functions.split(":")[0], "a") as file:
        file.write("def half(completions, **kwargs):\n    return [0.5] * len(completions)\n")
    out = run_lora(capsys, "--model", tiny_llama, "--data", write_prompts(tmp_path / "prompts", (("test", 4),)),
                   "--test", "--reward-functions", functions + ",half", "--reward-weights", 1, 2, *GRPO_RUN)
    numbers = {name: float(value) for name, value in re.findall(r"([\w/]+) (-?\d+\.\d+)", out)}
    assert numbers["rewards/half/mean"] == 0.5 and 0 < numbers["rewards/low_ids/mean"] < 1, out
    assert numbers["reward"] == pytest.approx(numbers["rewards/low_ids/mean"] + 1.0, abs=2e-3), out
    assert 0 < numbers["completions/mean_length"] <= 6, out
