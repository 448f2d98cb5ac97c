"""Preference tuning (--train-mode dpo / orpo / kto / simpo / cpo): the losses and metrics against TRL's, the
data formats, and training that makes held-out pairs preferred, over LoRA, DoRA, QLoRA and full fine-tuning."""
import itertools
import json
import re
from types import SimpleNamespace

import matplotlib.image
import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import (copy_of, preference_pairs, random_adapter, run_fuse, run_lora, unpaired, write_pairs,
                      write_unpaired)

import lora
import utils

BETA = 0.3


@pytest.fixture(scope="module")
def adapted(make_checkpoint, tmp_path_factory):
    """A tiny model with random LoRA adapters here, the same as a PEFT model in PyTorch; the base model in
    PyTorch; rows of 4 pairs, with the base model's log-probabilities of their responses (DPO's reference)."""
    folder, reference = make_checkpoint("llama")
    tmp = tmp_path_factory.mktemp("adapted")
    mx.random.seed(0)  # the same adapters (lora_a), whichever tests ran before
    model = random_adapter(folder, tmp / "adapters.safetensors", rank=4, scale=2.0)
    run_fuse("--model", folder, "--adapter-file", tmp / "adapters.safetensors", "--export-peft", tmp / "peft")
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy_of(reference), tmp / "peft").eval()
    base, tokenizer, _ = utils.load(str(folder))
    rows = lora.tokenize(preference_pairs(4, 0), tokenizer, True, 256, "train", objective=lora.DPO())
    return model, peft_model, reference, tokenizer, rows, lora.reference_logps(base, rows).reshape(-1, 2)


def ours(model, rows, train_mode, reference, **flags):
    """Our loss and metrics on the rows' pairs as one batch."""
    objective = lora.OBJECTIVES[train_mode](**{"beta": BETA, **flags})
    given = reference if train_mode == "dpo" else None
    batch = next(lora.iterate_batches(rows, len(rows) // 2, objective=objective, given=given))
    loss, count, sums = objective.loss(model, batch)
    return loss.item(), objective.metric_values(sums.tolist(), count.item())


def trl_examples(rows):
    """TRL's tokenized pairs ({"prompt_ids", "chosen_ids", "rejected_ids"}) from our rows: the same tokens."""
    examples = []
    for (chosen, start), (rejected, other) in zip(rows[::2], rows[1::2]):
        assert start == other and chosen[:start + 1] == rejected[:start + 1]  # one prompt, scored after it
        examples.append({"prompt_ids": chosen[:start + 1], "chosen_ids": chosen[start + 1:],
                         "rejected_ids": rejected[start + 1:]})
    return examples


@pytest.mark.parametrize("loss_type, label_smoothing, beta", [("sigmoid", 0.0, BETA), ("ipo", 0.0, BETA),
                                                              ("hinge", 0.0, 30.0), ("robust", 0.2, BETA)])
def test_dpo_loss_and_metrics_equal_trls_dpo_trainer(adapted, tmp_path, loss_type, label_smoothing, beta):
    """TRL's DPOTrainer on the PEFT model, the base model its reference, and the same tokens, for each loss
    type (the hinge's beta puts some margins past its corner, some not)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, peft_model, base, tokenizer, rows, reference = adapted
    loss, metrics = ours(model, rows, "dpo", reference, beta=beta, loss_type=loss_type,
                         label_smoothing=label_smoothing)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    config = DPOConfig(output_dir=str(tmp_path), beta=beta, report_to="none", use_cpu=True, bf16=False,
                       precompute_ref_log_probs=False, loss_type=[loss_type], label_smoothing=label_smoothing)
    trainer = DPOTrainer(peft_model, copy_of(base), args=config, train_dataset=Dataset.from_list(preference_pairs(4, 0)),
                         processing_class=tokenizer)
    with torch.no_grad():
        expected = trainer.compute_loss(peft_model, trainer.data_collator(trl_examples(rows))).item()
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # eval: the model is in eval mode
    assert abs(loss - expected) < 1e-5
    for name in lora.DPO.metrics:
        assert abs(metrics[name] - logged[name]) < 1e-4 * max(1, abs(logged[name])), name
    assert abs(logged["rewards/chosen"]) > 0.01 and abs(logged["rewards/margins"]) > 0.01  # policy is not reference


def test_orpo_loss_and_metrics_equal_trls_functions(adapted):
    """ORPO as TRL's ORPOTrainer computes it (its get_batch_logps and odds_ratio_loss, on PyTorch's logits),
    with the NLL term of the paper: the chosen response's mean over its tokens. TRL's decoder-only code also
    scores the prompt in that term."""
    from trl.experimental.orpo import ORPOTrainer

    model, peft_model, _, tokenizer, rows, reference = adapted
    loss, metrics = ours(model, rows, "orpo", reference)
    width = max(len(tokens) for tokens, _ in rows)
    input_ids = torch.tensor([tokens + [0] * (width - len(tokens)) for tokens, _ in rows])
    labels = torch.tensor([[-100] * (start + 1) + tokens[start + 1:] + [-100] * (width - len(tokens))
                           for tokens, start in rows])
    with torch.no_grad():
        logits = peft_model(input_ids).logits
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    chosen, rejected = logps[0::2], logps[1::2]
    trainer = SimpleNamespace(beta=BETA, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        trainer, chosen, rejected)
    nll = -chosen.mean()
    expected = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(), "logps/chosen": chosen.mean(),
                "logps/rejected": rejected.mean(), "nll_loss": nll, "log_odds_ratio": log_odds_ratio,
                "log_odds_chosen": log_odds_chosen}
    assert abs(loss - (nll - losses.mean()).item()) < 1e-5
    for name in lora.ORPO.metrics:
        assert abs(metrics[name] - expected[name].item()) < 1e-4 * max(1, abs(expected[name].item())), name


@pytest.mark.parametrize("train_mode, flags", [("cpo", {"label_smoothing": 0.1}), ("simpo", {"simpo_gamma": 0.7}),
                                               ("simpo", {"cpo_alpha": 0.5, "label_smoothing": 0.2})])
def test_simpo_and_cpo_losses_and_metrics_equal_trls_cpo_trainer(adapted, tmp_path, train_mode, flags):
    """TRL's CPOTrainer (loss_type "simpo" or "sigmoid") on the PEFT model and the same tokens: its NLL term a
    mean over the chosen responses' tokens (none with cpo_alpha 0, SimPO's default)."""
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    model, peft_model, _, tokenizer, rows, _ = adapted
    objective = lora.OBJECTIVES[train_mode](beta=BETA, **flags)
    batch = next(lora.iterate_batches(rows, len(rows) // 2, objective=objective))
    loss, count, sums = objective.loss(model, batch, objective.statistics(model, batch))
    metrics = objective.metric_values(sums.tolist(), count.item())
    assert ("nll_loss" in metrics) == (objective.cpo_alpha > 0)

    inputs = {}  # CPOTrainer's batch: each side's tokens, padded, its labels the responses' tokens alone
    for side, part in (("chosen", rows[0::2]), ("rejected", rows[1::2])):
        width = max(len(tokens) for tokens, _ in part)
        inputs[f"{side}_input_ids"] = torch.tensor([tokens + [0] * (width - len(tokens)) for tokens, _ in part])
        inputs[f"{side}_attention_mask"] = torch.tensor([[1] * len(tokens) + [0] * (width - len(tokens))
                                                         for tokens, _ in part])
        inputs[f"{side}_labels"] = torch.tensor([[-100] * (start + 1) + tokens[start + 1:]
                                                 + [-100] * (width - len(tokens)) for tokens, start in part])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    config = CPOConfig(output_dir=str(tmp_path), beta=BETA, loss_type="simpo" if train_mode == "simpo" else "sigmoid",
                       cpo_alpha=objective.cpo_alpha, simpo_gamma=getattr(objective, "simpo_gamma", 0.5),
                       label_smoothing=objective.label_smoothing, report_to="none", use_cpu=True, bf16=False)
    trainer = CPOTrainer(peft_model, args=config, train_dataset=Dataset.from_list(preference_pairs(4, 0)),
                         processing_class=tokenizer)
    with torch.no_grad():
        expected, logged = trainer.get_batch_loss_metrics(peft_model, inputs)
    assert abs(loss.item() - expected.item()) < 1e-5
    for name, value in metrics.items():
        assert abs(value - logged[name]) < 1e-4 * max(1, abs(logged[name])), name


def test_kto_loss_and_metrics_equal_trls_kto_trainer(adapted, tiny_llama, tmp_path):
    """TRL's KTOTrainer on the PEFT model, the base model its reference, on the same tokens: each example's
    completion and its KL row (its prompt with another example's completion), desirable and undesirable
    examples weighted apart."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    model, peft_model, base, tokenizer, _, _ = adapted
    records = unpaired(preference_pairs(4, 0))  # one batch of 8
    objective = lora.KTO(beta=BETA, desirable_weight=1.3, undesirable_weight=0.7, batch_size=8)
    rows = lora.tokenize(records, tokenizer, True, 256, "train", objective=objective)
    given = np.column_stack([lora.reference_logps(utils.load(str(tiny_llama))[0], rows).reshape(-1, 2), rows.labels])
    batch = next(lora.iterate_batches(rows, 8, objective=objective, given=given))
    loss, count, sums = objective.loss(model, batch, objective.statistics(model, batch))
    metrics = objective.metric_values(sums.tolist(), count.item())

    examples = []
    for (tokens, start), (kl_tokens, kl_start), record in zip(rows[0::2], rows[1::2], records):
        assert kl_start == start and kl_tokens[:start + 1] == tokens[:start + 1]  # one prompt, scored after it
        examples.append({"prompt_ids": tokens[:start + 1], "completion_ids": tokens[start + 1:],
                         "KL_completion_ids": kl_tokens[start + 1:], "label": record["label"]})
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    config = KTOConfig(output_dir=str(tmp_path), beta=BETA, desirable_weight=1.3, undesirable_weight=0.7,
                       per_device_train_batch_size=8, report_to="none", use_cpu=True, bf16=False)
    trainer = KTOTrainer(peft_model, copy_of(base), args=config, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer)
    with torch.no_grad():
        expected = trainer.compute_loss(peft_model, trainer.data_collator(examples)).item()
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert abs(loss.item() - expected) < 1e-5
    assert set(metrics) == set(lora.KTO.metrics)
    for name in lora.KTO.metrics:
        assert abs(metrics[name] - logged[name]) < 1e-4 * max(1, abs(logged[name])), name
    assert logged["kl"] > 0.01  # the policy is not the reference, and the KL term is not clamped to 0
    negative, zero = (objective.loss(model, batch, mx.array([kl, 8.0]))[0].item() for kl in (-5.0, 0.0))
    assert negative == zero  # a negative estimate counts as 0 (TRL's clamp)


def test_kto_rows_pair_each_prompt_with_the_completion_before_it(tiny_llama):
    """An example's KL row is its prompt and the completion of the example before it, within groups of
    --batch-size examples in the file's order (the group's first takes its last's), as TRL pairs them."""
    tokenizer = utils.load(str(tiny_llama))[1]
    records = unpaired(preference_pairs(3, 0))  # 6: a group of 4 and one of 2
    rows = lora.tokenize(records, tokenizer, True, 256, "train", objective=lora.KTO(batch_size=4))
    assert rows.labels.tolist() == [record["label"] for record in records]
    completions = [tokens[start + 1:] for tokens, start in rows[0::2]]
    for i, ((tokens, start), (kl_tokens, kl_start)) in enumerate(zip(rows[0::2], rows[1::2])):
        before = {0: 3, 4: 5}.get(i, i - 1)
        assert kl_start == start and kl_tokens == tokens[:start + 1] + completions[before]
        assert tokenizer.decode(completions[i]).startswith(records[i]["completion"])


def test_preference_rows_score_the_responses_alone_in_both_forms(tiny_llama, tmp_path):
    tokenizer = utils.load(str(tiny_llama))[1]
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    plain = {"prompt": "Q: the team when year is 4\nA: ", "chosen": "SELECT team", "rejected": "SELECT year"}
    chat = {"prompt": [{"role": "user", "content": "the team when year is 4"}],
            "chosen": [{"role": "assistant", "content": "SELECT team"}],
            "rejected": [{"role": "assistant", "content": "SELECT year"}]}
    for record, response_start in ((plain, len(tokenizer.encode(plain["prompt"]))),
                                   (chat, len(tokenizer.encode("<user>the team when year is 4\n<assistant>",
                                                               add_special_tokens=False)))):
        (chosen, start), (rejected, other) = lora.tokenize([record], tokenizer, True, 256, "train",
                                                           objective=lora.DPO())
        assert start == other == response_start - 1  # the first scored target is the response's first token
        assert chosen[:response_start] == rejected[:response_start]
        for tokens, answer in ((chosen, "SELECT team"), (rejected, "SELECT year")):
            assert answer in tokenizer.decode(tokens[response_start:])
            assert answer not in tokenizer.decode(tokens[:response_start])


@pytest.mark.parametrize("line, mode, message", [
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "sft",
     r"train.jsonl:2: a preference pair; train on it with --train-mode dpo, orpo, simpo or cpo"),
    ({"text": "a"}, "dpo", r"train.jsonl:1: a text example, but --train-mode dpo learns from preference pairs"),
    ({"prompt": "a", "chosen": "b"}, "orpo", r"train.jsonl:2: not a preference pair: expected \{\"prompt\", "
                                             r"\"chosen\", \"rejected\"\}"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}]}, "dpo", r"train.jsonl:2: not a preference pair"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "dpo",
     r"train.jsonl:2: the chosen and the rejected response are the same"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "orpo",
     r"train.jsonl:2: the chosen and the rejected response are the same"),
    ({"prompt": "a", "completion": "b", "label": "yes"}, "kto", r'train.jsonl:2: "label" is "yes", not true or false'),
    ({"prompt": "a", "completion": "b", "label": None}, "kto", r'train.jsonl:2: "label" is null, not true or false'),
    ({"prompt": "a", "completion": "b"}, "kto", r'train.jsonl:2: no "label": true for a desirable completion'),
    ({"prompt": "a", "completion": "", "label": True}, "kto", r"train.jsonl:2: an empty completion"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": ""}],
      "label": False}, "kto", r"train.jsonl:2: an empty completion"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "kto",
     r"train.jsonl:2: a preference pair, but --train-mode kto learns from unpaired examples"),
    ({"prompt": "a", "completion": 5, "label": True}, "kto", r"train.jsonl:2: not an unpaired example"),
])
def test_bad_preference_lines_name_the_line(tmp_path, line, mode, message):
    good = {"sft": {"text": "x"}, "kto": {"prompt": "a", "completion": "b", "label": True}}
    first = line if mode == "dpo" and "text" in line else good.get(mode, preference_pairs(1, 0)[0])
    lines = [first] if first is line else [first, line]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(utils.UserError, match=message):
        lora.load_dataset(tmp_path, "train", objective=lora.OBJECTIVES[mode]())


def test_beta_without_a_preference_mode_is_an_error():
    with pytest.raises(utils.UserError, match="--beta goes with --train-mode dpo, orpo, kto, simpo, cpo or grpo"):
        lora.parse_args(["--train", "--beta", "0.2"])


@pytest.mark.parametrize("train_mode", ["dpo", "cpo", "kto"])
def test_packed_preference_batches_give_the_same_loss_and_gradient(adapted, train_mode):
    """Packed, the batches of each kind (pairs with a reference, pairs whose loss reads the whole batch, KTO's
    completions and KL rows) give the same loss, sums and gradient."""
    import mlx.nn as nn

    model, _, _, tokenizer, rows, _ = adapted
    objective = lora.OBJECTIVES[train_mode](beta=BETA)
    if train_mode == "kto":
        objective = lora.KTO(beta=BETA, batch_size=8)
        rows = lora.tokenize(unpaired(preference_pairs(4, 0)), tokenizer, True, 256, "train", objective=objective)
    reference = np.random.default_rng(0).normal(-20, 2, (len(rows) // 2, 2)).astype(np.float32)
    given = np.column_stack([reference, rows.labels]) if train_mode == "kto" else None
    given = reference if train_mode == "dpo" else given
    loss_and_grad = nn.value_and_grad(model, objective.loss)
    results = []
    for pack in (False, True):
        batch = next(lora.iterate_batches(rows, len(rows) // 2, objective=objective, given=given, pack=pack))
        results.append(loss_and_grad(model, batch, objective.statistics(model, batch)))
    (loss, _, sums), grads = results[0]
    (packed_loss, _, packed_sums), packed_grads = results[1]
    assert abs(loss.item() - packed_loss.item()) < 1e-5
    assert np.allclose(np.array(sums), np.array(packed_sums), atol=1e-4)
    for (name, g), (_, h) in zip(lora.tree_flatten(grads), lora.tree_flatten(packed_grads)):
        assert np.allclose(np.array(g), np.array(h), atol=1e-5), name


def held_out_rewards(out):
    """(accuracy, margin) of the rewards on test.jsonl, from lora.py's log."""
    return tuple(map(float, re.findall(r"Test loss .*rewards/accuracies ([\d.]+), rewards/margins (-?\d+\.\d+)", out)[-1]))


@pytest.mark.parametrize("train_mode, fine_tune_type, quantized", [
    ("dpo", "lora", False), ("orpo", "lora", False), ("dpo", "dora", False), ("dpo", "lora", True),
    ("orpo", "full", False), ("kto", "lora", True), ("simpo", "lora", False), ("cpo", "lora", False)])
def test_preference_training_makes_held_out_pairs_preferred(tiny_llama, tmp_path, capsys, monkeypatch, train_mode,
                                                             fine_tune_type, quantized):
    """Trained on pairs (KTO: the same pairs unpaired), the model prefers the chosen response of held-out pairs
    (test.jsonl): rewards rank it first far more often than before training. QLoRA trains over a 4-bit model."""
    monkeypatch.chdir(tmp_path)  # adapters.safetensors: none before training
    data = write_unpaired(tmp_path / "kto") if train_mode == "kto" else write_pairs(tmp_path / "pairs")
    model = tiny_llama
    if quantized:
        import convert

        convert.convert(convert.build_parser().parse_args(["--hf-path", str(tiny_llama), "--mlx-path",
                                                           str(tmp_path / "q"), "-q", "--q-bits", "4",
                                                           "--q-group-size", "32"]))
        model = tmp_path / "q"
    flags = ["--model", model, "--data", data, "--train-mode", train_mode, "--beta", BETA, "--batch-size", 8,
             "--max-seq-length", 256]
    # DPO's rewards are 0 before training: its accuracy 0; those without a reference rank pairs already
    before = run_lora(capsys, *flags, "--test") if train_mode in ("orpo", "simpo", "cpo") else None
    out = run_lora(capsys, *flags, "--train", "--test", "--iters", 60, "--eval-on-start", "--steps-per-eval", 30,
                   "--learning-rate", 5e-4 if fine_tune_type == "full" else 2e-3, "--fine-tune-type", fine_tune_type,
                   "--lora-layers", 2 if fine_tune_type == "full" else 4)
    losses = [float(v) for v in re.findall(r"Train loss ([\d.]+)", out)]
    assert losses[-1] < losses[0]
    record = json.loads((tmp_path / "runs" / "1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(f"val_{name}" for name in lora.OBJECTIVES[train_mode]().metrics) <= set(record)
    # the plot: the loss, and a panel of each metric the log shows (rewards/margins, ...), 5 inches of 100 dots
    panels = matplotlib.image.imread(tmp_path / "runs" / "1" / "loss.png").shape[1] // 500
    assert panels == 3
    if train_mode == "kto":  # its held-out completions: the desirable ones' rewards above the others'
        assert float(re.findall(r"Test loss .*rewards/margins (-?\d+\.\d+)", out)[-1]) > 0
        # and the held-out pairs, as DPO rewards them with the model before the adapters as the reference
        out = run_lora(capsys, "--model", model, "--data", write_pairs(tmp_path / "pairs"), "--train-mode", "dpo",
                       "--beta", BETA, "--batch-size", 8, "--max-seq-length", 256, "--test")
    accuracy, margin = held_out_rewards(out)
    assert accuracy >= 0.75 and margin > 0  # the COUNT half is easy; the swapped half needs the question read
    if before is not None:  # their rewards rank most pairs right before training here: the margin grows
        assert accuracy >= held_out_rewards(before)[0] and margin > held_out_rewards(before)[1] + 0.05


def test_dpo_ipo_makes_held_out_pairs_preferred(tiny_llama, tmp_path, capsys, monkeypatch):
    """IPO, the loss type least like the sigmoid's (the others: equal to TRL's, above)."""
    monkeypatch.chdir(tmp_path)
    out = run_lora(capsys, "--model", tiny_llama, "--data", write_pairs(tmp_path / "pairs"), "--train-mode", "dpo",
                   "--loss-type", "ipo", "--beta", BETA, "--batch-size", 8, "--max-seq-length", 256, "--train", "--test", "--iters", 60,
                   "--eval-on-start", "--steps-per-eval", 30, "--learning-rate", 2e-3, "--lora-layers", 4)
    accuracy, margin = held_out_rewards(out)
    assert accuracy >= 0.75 and margin > 0


def test_dpo_adapters_resume_fuse_and_export_to_peft(make_checkpoint, tmp_path, capsys):
    """DPO-trained adapters are adapters like any other: a run resumed from its checkpoint ends where the
    uninterrupted one does, fuse.py merges them (transformers loads the result) and exports them to PEFT,
    with this model's logits."""
    import transformers
    from peft import PeftModel

    folder, reference = make_checkpoint("llama")
    data = write_pairs(tmp_path / "pairs")
    flags = ["--model", folder, "--data", data, "--train", "--train-mode", "dpo", "--batch-size", 4, "--iters", 10,
             "--save-every", 5, "--learning-rate", 2e-3, "--lora-layers", 2, "--val-batches", 0]
    run_lora(capsys, *flags, "--adapter-file", tmp_path / "whole" / "adapters.safetensors")
    run_lora(capsys, *flags, "--adapter-file", tmp_path / "resumed" / "adapters.safetensors",
             "--resume", tmp_path / "whole" / "runs" / "1" / "step-0000005")
    adapters = tmp_path / "whole" / "adapters.safetensors"
    whole, resumed = (mx.load(str(tmp_path / name / "adapters.safetensors")) for name in ("whole", "resumed"))
    assert all(np.array_equal(np.array(whole[k]), np.array(resumed[k])) for k in whole)

    model, tokenizer, _ = utils.load(str(folder))
    utils.load_adapters(model, adapters)
    tokens = tokenizer.encode(preference_pairs(1, 5)[0]["prompt"])
    expected = np.array(model(mx.array([tokens])))
    run_fuse("--model", folder, "--adapter-file", adapters, "--save-path", tmp_path / "fused",
             "--export-peft", tmp_path / "peft")
    fused = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    peft_model = PeftModel.from_pretrained(copy_of(reference), tmp_path / "peft").eval()
    for torch_model in (fused, peft_model):
        with torch.no_grad():
            assert np.abs(torch_model(torch.tensor([tokens])).logits.numpy() - expected).max() < 1e-4


def test_kto_resumes_exactly_and_refuses_other_mode_flags(tiny_llama, tmp_path, capsys):
    """A KTO run resumed from its checkpoint ends where the whole run does (its KL rows and reference made
    again alike); a flag of the mode changed since is refused."""
    data = write_unpaired(tmp_path / "kto", (("train", 16, 1),))
    flags = ["--model", tiny_llama, "--data", data, "--train", "--train-mode", "kto", "--desirable-weight", 1.5,
             "--batch-size", 4, "--iters", 6, "--save-every", 3, "--learning-rate", 2e-3, "--lora-layers", 2,
             "--val-batches", 0]
    run_lora(capsys, *flags, "--adapter-file", tmp_path / "whole" / "adapters.safetensors")
    checkpoint = tmp_path / "whole" / "runs" / "1" / "step-0000003"
    run_lora(capsys, *flags, "--adapter-file", tmp_path / "resumed" / "adapters.safetensors", "--resume", checkpoint)
    whole, resumed = (mx.load(str(tmp_path / name / "adapters.safetensors")) for name in ("whole", "resumed"))
    assert all(np.array_equal(np.array(whole[k]), np.array(resumed[k])) for k in whole)
    with pytest.raises(utils.UserError, match=r"trained with other flags: --desirable-weight 1.5 \(now 2.0\)"):
        run_lora(capsys, *flags, "--desirable-weight", 2, "--adapter-file", tmp_path / "other" / "a.safetensors",
                 "--resume", checkpoint)


def test_reference_pass_equals_the_model_forward_in_any_parts(adapted, monkeypatch):
    """The reference pass (a layer at a time, in parts that fit the memory, the output layer in chunks)
    gives the log-probabilities that the model's own forward pass gives each pair."""
    model, *_, rows, _ = adapted
    logps, _ = lora.sequence_logps(model, lora.sequences(rows[0::2] + rows[1::2], False))
    expected = np.array(logps).reshape(2, -1).T
    assert np.allclose(lora.reference_logps(model, rows).reshape(-1, 2), expected, atol=1e-4)
    monkeypatch.setattr(lora, "memory_size", lambda: 10 * 4 * model.args.hidden_size * 40)  # 40 positions
    monkeypatch.setattr(lora, "LOSS_LOGITS", 7 * model.args.vocab_size)
    assert np.allclose(lora.reference_logps(model, rows).reshape(-1, 2), expected, atol=1e-4)


@pytest.mark.parametrize("sort", [False, True])
def test_examples_read_are_those_of_the_training_batches(sort):
    """examples_read names the examples of the first N training batches, within an epoch and across epochs
    (then every one: None); pairs read as one example."""
    rows = lora.Rows([([i // 2] * (2 + i % 7), 0) for i in range(2 * 30)])  # 30 pairs; a row holds its pair's index
    for batches in (1, 5, 7, 8, 40):
        read = lora.examples_read(rows, 4, 3, sort, batches, 2)
        taken = itertools.islice(lora.iterate_batches(rows, 4, train=True, seed=3, sort=sort,
                                                      objective=lora.DPO(), given=np.zeros((30, 2))), batches)
        expected = sorted({int(i) for batch in taken for i in np.array(batch.sequences.rows.inputs[:, 0])})
        assert (read is None and len(expected) == 30) or read.tolist() == expected


@pytest.mark.parametrize("train_mode", ["dpo", "kto"])
def test_a_run_shorter_than_an_epoch_computes_the_reference_of_its_examples_alone(tiny_llama, tmp_path, capsys,
                                                                                 monkeypatch, train_mode):
    """A run that reads fewer examples than the training set holds computes their reference alone (and the
    first batch's, which it evaluates before saving), and trains as with every example's reference."""
    data = write_unpaired(tmp_path / "kto") if train_mode == "kto" else write_pairs(tmp_path / "pairs")
    flags = ["--model", tiny_llama, "--data", data, "--train", "--train-mode", train_mode, "--batch-size", 4,
             "--iters", 5, "--steps-per-report", 1, "--learning-rate", 2e-3, "--lora-layers", 2, "--val-batches", 0]
    out = run_lora(capsys, *flags, "--adapter-file", tmp_path / "some" / "adapters.safetensors")
    computed = int(re.search(r"reference: the log-probabilities of \D+ (\d+)", out).group(1))
    examples = 128 if train_mode == "kto" else 64  # (write_unpaired: each pair's two responses)
    assert computed == len(np.union1d(lora.examples_read(list(range(examples)), 4, 0, False, 5), np.arange(4)))
    assert computed < examples
    monkeypatch.setattr(lora, "examples_read", lambda *args: None)  # every example's
    every = run_lora(capsys, *flags, "--adapter-file", tmp_path / "every" / "adapters.safetensors")
    assert re.search(rf"of \D+ {examples} ", every)
    losses = [[float(v) for v in re.findall(r"Train loss ([\d.]+)", o)] for o in (out, every)]
    assert len(losses[0]) == 5 and np.allclose(*losses, atol=1e-5)
