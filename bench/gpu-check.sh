#!/usr/bin/env bash
# The whole GPU check of the local trainer, in one go and under 8 minutes on one FLUX.1 load:
# at 512 px each memory mode's peak memory and seconds per step (bf16, int8, nf4) and the plain
# diffusers-example loop's; at 1024 px bf16 and the plain loop; the ratio ours/plain at both and
# model FLOPs utilisation (bench/train_flux.py prints every figure).
#
#   bench/gpu-check.sh [FLUX.1 diffusers folder]    (default: $SELFIE_LORA_BASE_MODEL)
#
# Without a GPU it says so and runs the CPU path on tiny (plumbing only). Writes the figures as
# JSON to ${OUT:-.}/gpu-check.json as well.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi
out="${OUT:-.}/gpu-check.json"
started=$SECONDS
if ! "$py" -c 'import torch, diffusers, peft, torchao' 2>/dev/null; then
    echo "gpu-check: $py lacks torch/diffusers/peft/torchao: install the 'local' extra (or set PYTHON)" >&2
    exit 3
fi

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: no GPU here; running the CPU path on tiny (plumbing, not speed figures)"
    OMP_NUM_THREADS=1 timeout 300 "$py" bench/train_flux.py --model tiny --steps 4 --json "$out"
    exit $?
fi

model="${1:-${SELFIE_LORA_BASE_MODEL:-}}"
if [[ -z "$model" || ! -f "$model/model_index.json" ]]; then
    echo "gpu-check: give a FLUX.1 diffusers folder (argument or SELFIE_LORA_BASE_MODEL); got '${model}'" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
"$py" -c 'import torch, diffusers, peft, torchao; print("torch", torch.__version__, "diffusers",
diffusers.__version__, "peft", peft.__version__, "torchao", torchao.__version__)'

# One process: the model is read from disk once; each run trains a fresh copy of the transformer.
# 8 steps, the first 3 (allocator and kernel warm-up) left out of s/step.
timeout 450 "$py" bench/train_flux.py --model "$model" --steps 8 --warmup 3 --rank 16 --batch 1 \
    --resolution 512 1024:bf16 --modes bf16,int8,nf4 --json "$out"
echo "gpu-check: done in $((SECONDS - started)) s; figures in $out"
