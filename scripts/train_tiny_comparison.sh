#!/usr/bin/env bash
# The laptop comparison of issue 6, end to end and resumable (every stage picks up where it stopped):
#   1. a store of encoded clips, then the bidirectional teacher (configs/tiny/teacher.yaml) -> runs/tiny/teacher/final
#   2. its ODE pairs + the ODE-regression init                                      -> runs/tiny/ode_init/final
#   3. every causal method from that same teacher, in parallel where the machine has room:
#      teacher forcing, diffusion forcing, CausVid, Self Forcing with DMD / SiD / GAN
#   4. selfforcing eval over all of them at 1x, 5x and 10x the training length     -> runs/tiny/eval/
# Usage: scripts/train_tiny_comparison.sh [key=value overrides for every training stage]
#   JOBS=N       training runs at once in stage 3 (default 1 on CPU; 6 is right for one GPU)
#   SAMPLES=N    videos per method and length in the evaluation (default 16)
#   BUDGET=laptop (default; cpu is the same) the 2-core budget of scripts/tiny_budget.sh; BUDGET=full the recipes as
#                written (on one H100 the training stages took 18 minutes with JOBS=6, before the joint-training teacher)
set -euo pipefail
cd "$(dirname "$0")/.."
SF="${SELFFORCING:-.venv/bin/selfforcing}"
JOBS="${JOBS:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
R=runs/tiny
source scripts/tiny_budget.sh  # TEACHER, ODE, INIT, BASELINE, DISTILL, SAMPLES

"$SF" data encode "${STORE[@]}" --num-frames 12 --num-digits 1,1 --images-per-digit 4 --text-len 24 --batch-size 64 \
    --out $R/store
"$SF" train --config configs/tiny/teacher.yaml --no-progress "${TEACHER[@]}" "$@"
"$SF" data ode-pairs --teacher $R/teacher/final "${ODE[@]}" --num-digits 1,1 --latent-shape 12,8,16,16 --shift 3 \
    --guidance-scale 3 --text-len 24 --batch-size 32 --out $R/ode_pairs
"$SF" train --config configs/tiny/ode_init.yaml --no-progress "${INIT[@]}" "$@"

run_stage() {  # recipe [overrides]: log to runs/tiny/<recipe>.log, resume if interrupted
    "$SF" train --config "configs/tiny/$1.yaml" --no-progress "${@:2}" > "$R/$1.log" 2>&1 \
        && echo "done: $1" || { echo "FAILED: $1 (see $R/$1.log)"; return 1; }
}
export -f run_stage
export SF R
printf '%s\n' teacher_forcing diffusion_forcing | xargs -P "$JOBS" -I{} bash -c 'run_stage {} "$@"' _ "${BASELINE[@]}" "$@"
printf '%s\n' causvid self_forcing_dmd self_forcing_sid self_forcing_gan \
    | xargs -P "$JOBS" -I{} bash -c 'run_stage {} "$@"' _ data.kind=store data.path=$R/store "${ONE[@]}" \
        "${DISTILL[@]}" "$@"

"$SF" eval --out $R/eval --lengths 1,5,10 --prompts 16 --num-samples "$SAMPLES" --num-steps 16 \
    --checkpoint teacher=$R/teacher/final:bidirectional \
    --checkpoint teacher_forcing=$R/teacher_forcing/final:many-step \
    --checkpoint diffusion_forcing=$R/diffusion_forcing/final:many-step \
    --checkpoint ode_init=$R/ode_init/final \
    --checkpoint causvid=$R/causvid/final \
    --checkpoint self_forcing_dmd=$R/self_forcing_dmd/final \
    --checkpoint self_forcing_sid=$R/self_forcing_sid/final \
    --checkpoint self_forcing_gan=$R/self_forcing_gan/final
echo "report: $R/eval/report.md"
