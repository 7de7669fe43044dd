#!/usr/bin/env bash
# The laptop pipeline on Moving-Digits, stage by stage (each stage resumes if interrupted):
#   1. bidirectional teacher   2. teacher ODE pairs   3. ODE-regression init   4. Self Forcing with DMD
# Usage: [BUDGET=cpu] scripts/train_tiny_pipeline.sh [extra key=value overrides for every training stage]
#   BUDGET=cpu: the 2-core budget of scripts/tiny_budget.sh, about 80 min on 2 cores; it made the shipped model
set -euo pipefail
cd "$(dirname "$0")/.."
SF="${SELFFORCING:-.venv/bin/selfforcing}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
source scripts/tiny_budget.sh  # ODE, INIT, DISTILL

"$SF" train --config configs/tiny/teacher.yaml "$@"
"$SF" data ode-pairs --teacher runs/tiny/teacher/final "${ODE[@]}" --latent-shape 12,8,16,16 \
    --shift 3 --guidance-scale 3 --text-len 24 --out runs/tiny/ode_pairs
"$SF" train --config configs/tiny/ode_init.yaml "${INIT[@]}" "$@"
"$SF" train --config configs/tiny/self_forcing_dmd.yaml "${DISTILL[@]}" "$@"
echo "generator: runs/tiny/self_forcing_dmd/final"
