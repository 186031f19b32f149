#!/usr/bin/env bash
# GPU timing check (issue 15): a few bf16 steps of MGSR against GKD and DistillationTrainer on the lab's models,
# one process, ratios printed. Needs a CUDA machine with this package's dependencies installed (torch with CUDA,
# transformers, trl, peft, accelerate, datasets, greenlet: `pip install -e .[bench]`); the lab teacher ships with
# the package and the initial student trains in ~20 s. Bounded to 5 minutes.
#
#     bash benchmarks/gpu_check.sh            # writes benchmarks/results/step_gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible')"
export HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
timeout 300 python benchmarks/bench_step.py --device cuda --bf16 --steps 10 \
    --runs gkd gkd_nogc distillation mgsr mgsr_nogc mgsr_twopass mgsr_stop --out "${OUT:-benchmarks/results}/step_gpu.json"
