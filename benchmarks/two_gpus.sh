#!/bin/bash
# Data-parallel training over NCCL on one machine of several NVIDIA GPUs, measured in one run:
#
#   bash benchmarks/two_gpus.sh OUT [GPUS] [DATA]     (defaults: 2 GPUs, ../shared/data/wikisql)
#
# The random Llama-7B shape (bench.py --shape llama-7b, bf16), the seed recipe (LoRA rank 8, scale 20, q/v of
# the last 16 layers, learning rate 1e-5), WikiSQL. Needs MLX with its CUDA backend (pip install "mlx[cuda13]")
# and NCCL (the nvidia-nccl wheel that PyTorch or mlx-cuda brings). Writes OUT/*.json and OUT/summary.txt:
# 1. the same loss curve, 50 steps: 1 GPU at batch 8 against GPUS GPUs at a global batch of 8;
# 2. tokens/s of GPUS GPUs at global batches 4*GPUS and 16*GPUS against 1 GPU at 4 and 16 (the same batch
#    per GPU), and peak memory per GPU;
# 3. QLoRA (4-bit) on GPUS GPUs at a global batch of 8.
set -euo pipefail
OUT=${1:?usage: two_gpus.sh OUT [GPUS] [DATA]}
GPUS=${2:-2}
DATA=${3:-../shared/data/wikisql}
mkdir -p "$OUT"
# NVLink multicast stays off: a program that uses it can put a shared host's GPUs out of service
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
# MLX's NCCL backend loads libnccl.so.2: use the one an installed nvidia-nccl wheel holds, if none is on the path
if ! ldconfig -p | grep -q libnccl.so.2; then
  nccl=$(python3 -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'lib'))" 2>/dev/null || true)
  export LD_LIBRARY_PATH=${nccl:+$nccl:}${LD_LIBRARY_PATH:-}
fi
R="--shape llama-7b --data $DATA --lora-layers 16 --lora-rank 8 --lora-scale 20 --learning-rate 1e-5"
# mlx.launch, also where pip installed MLX with --target (and its command is not on the PATH)
launch() { python3 -c "from mlx._distributed_utils.launch import main; main()" --backend nccl -n "$GPUS" -- "$@"; }

echo "== 1. the loss curve: 1 GPU at batch 8, $GPUS GPUs at a global batch of 8 (50 steps)"
python3 benchmarks/bench.py $R --batch-size 8 --warmup-steps 0 --steps 50 > "$OUT/curve1.json" 2> "$OUT/curve1.log"
launch python3 benchmarks/bench.py $R --batch-size 8 --warmup-steps 0 --steps 50 > "$OUT/curve$GPUS.json" 2> "$OUT/curve$GPUS.log"

echo "== 2. speed at the same batch per GPU"
for b in 4 16; do
  python3 benchmarks/bench.py $R --batch-size $b --steps 50 > "$OUT/one_b$b.json" 2> "$OUT/one_b$b.log"
  launch python3 benchmarks/bench.py $R --batch-size $((b * GPUS)) --steps 50 > "$OUT/many_b$b.json" 2> "$OUT/many_b$b.log"
done

echo "== 3. QLoRA, 4-bit, global batch 8"
launch python3 benchmarks/bench.py $R -q --batch-size 8 --steps 50 > "$OUT/qlora.json" 2> "$OUT/qlora.log"

python3 - "$OUT" "$GPUS" <<'PY' | tee "$OUT/summary.txt"
import json, re, sys
out, gpus = sys.argv[1], int(sys.argv[2])
def losses(name):
    return [float(x) for x in re.findall(r"Step \d+/\d+: loss ([\d.]+)", open(f"{out}/{name}.log").read())]
one, many = losses("curve1"), losses(f"curve{gpus}")
print(f"loss curve, 50 steps: largest difference {max(abs(a - b) for a, b in zip(one, many)):.4f} "
      f"(first {one[0]:.4f} / {many[0]:.4f}, last {one[-1]:.4f} / {many[-1]:.4f})")
for b in (4, 16):
    a, m = (json.load(open(f"{out}/{n}.json")) for n in (f"one_b{b}", f"many_b{b}"))
    print(f"batch {b} a GPU: 1 GPU {a['tokens_per_second']:.0f} tokens/s, {a['peak_memory_gb']:.1f} GB; "
          f"{gpus} GPUs {m['tokens_per_second']:.0f} tokens/s ({m['tokens_per_second_per_rank']:.0f} a GPU), "
          f"{m['peak_memory_gb']:.1f} GB a GPU at most: {m['tokens_per_second'] / a['tokens_per_second']:.2f}x")
q = json.load(open(f"{out}/qlora.json"))
print(f"QLoRA 4-bit, global batch 8 on {gpus} GPUs: {q['tokens_per_second']:.0f} tokens/s, "
      f"{q['peak_memory_gb']:.1f} GB a GPU at most")
PY
