#!/usr/bin/env bash
# The laptop pipeline on Moving-Digits, stage by stage (each stage resumes if interrupted):
#   1. bidirectional teacher   2. teacher ODE pairs   3. ODE-regression init   4. Self Forcing with DMD
# Usage: [BUDGET=cpu|cpu-long|cpu-1digit] [RUNS=runs/tiny] scripts/train_tiny_pipeline.sh [key=value overrides for every stage]
#   BUDGET=cpu-1digit: one-digit clips, a 4200-step teacher with a decaying lr, about 2 h 40 min on 2 cores; it made the shipped model
#   BUDGET=cpu: the 2-core budget of scripts/tiny_budget.sh on the full data, about 80 min on 2 cores
#   BUDGET=cpu-long: a longer teacher (TEACHER_STEPS), then the same stages (README: its student, not shipped)
#   RUNS: the folder of the four stages' outputs (default runs/tiny, as the recipes say)
set -euo pipefail
cd "$(dirname "$0")/.."
SF="${SELFFORCING:-.venv/bin/selfforcing}"
R="${RUNS:-runs/tiny}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
source scripts/tiny_budget.sh  # TEACHER, ODE, INIT, DISTILL

"$SF" train --config configs/tiny/teacher.yaml out_dir=$R/teacher "${TEACHER[@]}" "$@"
"$SF" data ode-pairs --teacher $R/teacher/final "${ODE[@]}" --latent-shape 12,8,16,16 \
    --shift 3 --guidance-scale 3 --text-len 24 --batch-size 32 --out $R/ode_pairs
"$SF" train --config configs/tiny/ode_init.yaml out_dir=$R/ode_init generator.checkpoint=$R/teacher/final \
    data.path=$R/ode_pairs "${INIT[@]}" "$@"
"$SF" train --config configs/tiny/self_forcing_dmd.yaml out_dir=$R/self_forcing_dmd \
    generator.checkpoint=$R/ode_init/final teacher.checkpoint=$R/teacher/final critic.checkpoint=$R/teacher/final \
    "${DISTILL[@]}" "$@"
echo "generator: $R/self_forcing_dmd/final"
