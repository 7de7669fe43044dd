#!/usr/bin/env bash
# The laptop pipeline on Moving-Digits, stage by stage. Every stage resumes where it stopped, so an interrupted run
# continues when the same command is run again (finished stages return at once):
#   0. a store of encoded clips (autoencoder latents + MiniLM states), so no training step renders or encodes; each
#      digit starts behind its motion (--start behind), so a clip shows its caption's direction from end to end
#   1. the bidirectional teacher (configs/tiny/teacher.yaml: image-video joint training from the store), then
#      1b. its caption layout stage (configs/tiny/teacher_layout.yaml: where the caption puts the digit)
#   2. teacher ODE pairs   3. ODE-regression init of the causal student   4. Self Forcing with DMD
# Each stage's wall time is appended to $RUNS/stage_times.jsonl ({"stage", "seconds", "finished"}).
# Usage: [BUDGET=laptop|full] [RUNS=runs/tiny] scripts/train_tiny_pipeline.sh [key=value overrides for every training stage]
#   BUDGET=laptop (default): the shipped model's budget on 2 CPU cores (scripts/tiny_budget.sh; times in README)
#   BUDGET=full: the recipes as written (512 ODE pairs of 48 steps, every stage its recipe's max_steps): a GPU budget
set -euo pipefail
cd "$(dirname "$0")/.."
SF="${SELFFORCING:-.venv/bin/selfforcing}"
R="${RUNS:-runs/tiny}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
BUDGET="${BUDGET:-laptop}"
source scripts/tiny_budget.sh  # STORE, TEACHER, LAYOUT, ODE, INIT, DISTILL
mkdir -p "$R"

stage() {  # name command...: run it, then append its wall time to $R/stage_times.jsonl
    local name=$1 start
    shift
    start=$(date +%s)
    "$@"
    printf '{"stage": "%s", "seconds": %d, "finished": "%s", "budget": "%s"}\n' "$name" $(( $(date +%s) - start )) \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$BUDGET" >> "$R/stage_times.jsonl"
}

stage store "$SF" data encode "${STORE[@]}" --num-frames 12 --num-digits 1,1 --images-per-digit 4 --start behind \
    --text-len 24 --batch-size 64 --out "$R/store"
stage teacher "$SF" train --config configs/tiny/teacher.yaml --no-progress out_dir="$R/teacher" data.path="$R/store" \
    "${TEACHER[@]}" "$@"
stage teacher_layout "$SF" train --config configs/tiny/teacher_layout.yaml --no-progress out_dir="$R/teacher_layout" \
    generator.checkpoint="$R/teacher/final" data.path="$R/store" "${LAYOUT[@]}" "$@"
stage ode_pairs "$SF" data ode-pairs --teacher "$R/teacher_layout/final" "${ODE[@]}" --num-digits 1,1 \
    --latent-shape 12,8,16,16 --shift 3 --guidance-scale 3 --text-len 24 --batch-size 32 --out "$R/ode_pairs"
stage ode_init "$SF" train --config configs/tiny/ode_init.yaml --no-progress out_dir="$R/ode_init" \
    generator.checkpoint="$R/teacher_layout/final" data.path="$R/ode_pairs" "${INIT[@]}" "$@"
stage self_forcing_dmd "$SF" train --config configs/tiny/self_forcing_dmd.yaml --no-progress \
    out_dir="$R/self_forcing_dmd" generator.checkpoint="$R/ode_init/final" \
    teacher.checkpoint="$R/teacher_layout/final" critic.checkpoint="$R/teacher_layout/final" data.kind=store \
    data.path="$R/store" "data.num_digits=[1,1]" \
    data.images_per_digit=4 "${DISTILL[@]}" "$@"
echo "generator: $R/self_forcing_dmd/final (stage times: $R/stage_times.jsonl)"
