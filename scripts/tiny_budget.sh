# Sourced by the tiny pipeline scripts: the per-stage budget of the laptop pipeline, chosen by BUDGET.
#   full (default): the recipes as written: 512 teacher ODE pairs of 48 Euler steps, every stage its recipe's max_steps
#   cpu:  the 2-core budget: the recipes' 3000-step teacher, 128 ODE pairs of 24 steps, ODE init 500 steps, teacher
#         and diffusion forcing 200 steps, CausVid / Self Forcing 100 steps each (EMA from step 50), 4 eval samples.
#         Measured on 2 cores: teacher 63 min, ODE pairs 4 min, ODE init 8 min, Self Forcing DMD 4 min (README)
#   cpu-long: the same stages after a longer teacher (TEACHER_STEPS, default 6500, about 1 h 50 min on 2 cores),
#         with 256 ODE pairs and Self Forcing 200 steps (EMA from step 100). Tried with the default: its
#         student read fewer digits than the cpu budget's (README "Results"), so it is an experiment, not the default
#   cpu-1digit: easier data for the 2-core budget: one digit per clip, each class drawn from its first
#         IMAGES_PER_DIGIT (default 4) MNIST images; the teacher at 4x the learning rate (1.2e-3: loss 0.68 vs 0.84
#         over steps 200-300 of a 300-step probe) for TEACHER_STEPS (default 4200), held until DECAY_START (default
#         2500), then cosine down to 5% of it (its samples at a constant 1.2e-3 were clean at step 1250 and fragmented
#         again at 1500); then 128 ODE pairs, ODE init 500 steps and Self Forcing 200 steps (EMA from step 50).
#         It made the shipped model (README "Results"), about 2 h 40 min on 2 cores. TEACHER_STEPS=3000
#         DECAY_START=1800 made the model shipped before it (2 h; the prompt's digit in 40% of frames against 48%)
case "${BUDGET:-full}" in
    full) TEACHER=(); ODE=(--num-prompts 512 --steps 48); INIT=(); BASELINE=(); DISTILL=(); SAMPLES="${SAMPLES:-16}" ;;
    cpu)  TEACHER=(); ODE=(--num-prompts 128 --steps 24); INIT=(max_steps=500); BASELINE=(max_steps=200)
          DISTILL=(max_steps=100 ema_start_step=50); SAMPLES="${SAMPLES:-4}" ;;
    cpu-long) TEACHER=(max_steps="${TEACHER_STEPS:-6500}"); ODE=(--num-prompts 256 --steps 24); INIT=(max_steps=500)
          BASELINE=(max_steps=200); DISTILL=(max_steps=200 ema_start_step=100); SAMPLES="${SAMPLES:-4}" ;;
    cpu-1digit) ONE=("data.num_digits=[1,1]" "data.images_per_digit=${IMAGES_PER_DIGIT:-4}")
          TEACHER=(max_steps="${TEACHER_STEPS:-4200}" generator_optim.lr=1.2e-3 generator_optim.decay=cosine
                   generator_optim.decay_start_step="${DECAY_START:-2500}" generator_optim.min_lr_ratio=0.05 "${ONE[@]}")
          ODE=(--num-prompts 128 --steps 24 --num-digits 1,1); INIT=(max_steps=500); BASELINE=(max_steps=200 "${ONE[@]}")
          DISTILL=(max_steps=200 ema_start_step=50 "${ONE[@]}"); SAMPLES="${SAMPLES:-4}" ;;
    *) echo "BUDGET must be full, cpu, cpu-long or cpu-1digit" >&2; exit 2 ;;
esac
