# Sourced by the tiny pipeline scripts: the per-stage budget of the laptop pipeline, chosen by BUDGET.
#   laptop (default; `cpu` is the same): the shipped model's budget on 2 CPU cores: a store of 10,000 encoded clips,
#         the teacher recipe as written (configs/tiny/teacher.yaml), 128 ODE pairs of 24 Euler steps, ODE init 500
#         steps, Self Forcing 1400 steps (EMA from step 50); baselines (teacher / diffusion forcing) 200 steps and
#         CausVid 200 steps for the comparison; 4 eval samples. Stage times: README "Results".
#   full: the recipes as written: 20,000 clips, 512 teacher ODE pairs of 48 Euler steps, every stage its recipe's
#         max_steps (a GPU budget)
# Every stage trains on one digit per clip, each class drawn from its first 4 MNIST train images (4 handwritings).
ONE=("data.num_digits=[1,1]" "data.images_per_digit=4")
case "${BUDGET:-laptop}" in
    full) STORE=(--num-clips 20000); TEACHER=(); LAYOUT=(); ODE=(--num-prompts 512 --steps 48); INIT=(); BASELINE=("${ONE[@]}")
          DISTILL=(); SAMPLES="${SAMPLES:-16}" ;;
    laptop|cpu) STORE=(--num-clips 10000); TEACHER=(); LAYOUT=(); ODE=(--num-prompts 128 --steps 24); INIT=(max_steps=500)
          BASELINE=(max_steps=200 "${ONE[@]}"); DISTILL=(max_steps=1400 ema_start_step=50); SAMPLES="${SAMPLES:-4}" ;;
    *) echo "BUDGET must be laptop (or cpu) or full" >&2; exit 2 ;;
esac
