# Sourced by the tiny pipeline scripts: the per-stage budget of the laptop pipeline, chosen by BUDGET.
#   full (default): the recipes as written: 512 teacher ODE pairs of 48 Euler steps, every stage its recipe's max_steps
#   cpu:  the 2-core budget: the recipes' 3000-step teacher, 128 ODE pairs of 24 steps, ODE init 500 steps, teacher
#         and diffusion forcing 200 steps, CausVid / Self Forcing 100 steps each (EMA from step 50), 4 eval samples.
#         Measured on 2 cores: teacher 63 min, ODE pairs 4 min, ODE init 8 min, Self Forcing DMD 4 min (README)
case "${BUDGET:-full}" in
    full) ODE=(--num-prompts 512 --steps 48); INIT=(); BASELINE=(); DISTILL=(); SAMPLES="${SAMPLES:-16}" ;;
    cpu)  ODE=(--num-prompts 128 --steps 24); INIT=(max_steps=500); BASELINE=(max_steps=200)
          DISTILL=(max_steps=100 ema_start_step=50); SAMPLES="${SAMPLES:-4}" ;;
    *) echo "BUDGET must be full or cpu" >&2; exit 2 ;;
esac
