#!/bin/bash
# mlx-lm-lora's GRPO (pip install mlx-lm-lora==5.10.2), set as lora.py's GRPO runs by default, the anchor of
# benchmarks/wallclock.py:
#
#   bash benchmarks/mlxlm_lora_grpo.sh MODEL DATA ITERS BATCH_SIZE GROUP MAX_COMPLETION
#
# BATCH_SIZE counts completions, as lora.py's --batch-size does: BATCH_SIZE / GROUP prompts a step, GROUP
# (--num-generations) completions of each, of at most MAX_COMPLETION tokens. DATA is a folder of {"prompt",
# "answer"} lines (data/grpo): its train.jsonl alone is given, so that no validation runs. The settings are
# lora.py's defaults: LoRA rank 8, scale 20, dropout 0 on q_proj and v_proj of the last 16 layers; Adam at 1e-5;
# seed 0; sampling at temperature 0.8; beta 0 (no reference pass); epsilon 0.2; one update on each batch of
# completions; the loss a mean over the batch's completion tokens (lora.py's dapo is mlx-lm-lora's bnpo); the
# reward rewards.py's exact_answer. Four of them mlx-lm-lora's command line cannot set, so they are set in it
# below. Like lora.py, it stops a completion at EOS. It prints PEAK_MEM_GB, MLX's peak memory, for wallclock.py.
set -euo pipefail
if [ $# -ne 6 ]; then
  echo "mlxlm_lora_grpo.sh: error: usage: mlxlm_lora_grpo.sh MODEL DATA ITERS BATCH_SIZE GROUP MAX_COMPLETION" >&2
  exit 2
fi
MODEL=$1; DATA=$2; ITERS=$3; BATCH_SIZE=$4; GROUP=$5; MAX_COMPLETION=$6
for name in ITERS BATCH_SIZE GROUP MAX_COMPLETION; do
  if ! [[ ${!name} =~ ^[1-9][0-9]*$ ]]; then
    echo "mlxlm_lora_grpo.sh: error: $name must be a positive integer, not '${!name}'" >&2
    exit 2
  fi
done
if [ $((BATCH_SIZE % GROUP)) -ne 0 ]; then
  echo "mlxlm_lora_grpo.sh: error: BATCH_SIZE $BATCH_SIZE must be a multiple of GROUP $GROUP (it counts completions)" >&2
  exit 2
fi
if [ ! -f "$DATA/train.jsonl" ]; then
  echo "mlxlm_lora_grpo.sh: error: $DATA/train.jsonl: no such file" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/data"
ln -s "$(realpath "$DATA/train.jsonl")" "$work/data/train.jsonl"
# fuse false: by default it writes the whole model with the adapters fused into it after training
cat > "$work/config.yaml" <<YAML
fuse: false
lora_parameters: {rank: 8, scale: 20.0, dropout: 0.0}
YAML
python3 - "$(cd "$(dirname "$0")/.." && pwd)" -c "$work/config.yaml" --model "$MODEL" --data "$work/data" \
  --train --train-mode grpo --iters "$ITERS" --batch-size $((BATCH_SIZE / GROUP)) --group-size "$GROUP" \
  --max-completion-length "$MAX_COMPLETION" --num-layers 16 --learning-rate 1e-5 --seed 0 --temperature 0.8 --beta 0 \
  --epsilon 0.2 --grpo-loss-type bnpo --reward-functions exact_answer --steps-per-report 10 --save-every "$ITERS" \
  --adapter-path "$work/adapters" <<'PY'
import sys
import mlx.core as mx
import mlx_lm_lora.utils
from mlx_lm.sample_utils import make_sampler
from mlx_lm_lora import train
from mlx_lm_lora.trainer import datasets, grpo_trainer
from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function

sys.path.append(sys.argv.pop(1))  # this repository's root
import rewards  # noqa: E402

# lora.py's settings where mlx-lm-lora's command line has none: the same reward function; each prompt's text
# tokenized as it is (mlx-lm-lora would put it in the chat template after a system prompt of its own: longer
# sequences); adapters on q_proj and v_proj (it adapts every linear layer); temperature alone (it also keeps
# the top 20 tokens and top-p 0.95)
register_reward_function()(rewards.exact_answer)


class RawPrompts(datasets.GRPODataset):
    def __init__(self, data, tokenizer, **keys):
        super().__init__(data, tokenizer, **keys, text_completion_key=keys.get("prompt_key", "prompt"))


datasets.GRPODataset = RawPrompts
to_lora = mlx_lm_lora.utils.linear_to_lora_layers
mlx_lm_lora.utils.linear_to_lora_layers = lambda model, num_layers, config, use_dora: to_lora(
    model, num_layers, {**config, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}, use_dora)
grpo_trainer.make_sampler = lambda temperature, **others: make_sampler(temperature)

sys.argv = ["mlx_lm_lora.train"] + sys.argv[1:]
train.main()
print(f"PEAK_MEM_GB {mx.get_peak_memory() / 1e9:.3f}")
PY
# it reports some failures (a reward function it does not know) and returns without training
if [ ! -f "$work/adapters/adapters.safetensors" ]; then
  echo "mlxlm_lora_grpo.sh: error: mlx-lm-lora saved no adapters: it did not train (its output is above)" >&2
  exit 1
fi
