#!/usr/bin/env bash
# The performance benchmarks on a CUDA GPU (bf16 weights, activations and KV cache; SDPA flash kernels).
#   bash benchmarks/gpu_bench.sh [OUT_DIR]        (default benchmarks/results; needs torch with CUDA + diffusers)
# Each step writes one JSON; a failing step is reported and the others still run.
# The Wan stream runs one round by default (1x streamed 4 times, 2x twice: about 7 minutes on an H100 with recompute
# at ~3.9 s per chunk); WAN_STREAM_ROUNDS=N for more.
set -u
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
SF="python3 -m selfforcing.cli"
run() { local name=$1; shift; echo "== $name: $*"; if "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1; then tail -n 3 "$OUT/$name.log"; else echo "FAILED ($name)"; tail -n 25 "$OUT/$name.log"; fi; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
run chunk_step_small_cuda_bf16 $SF bench chunk --preset small --device cuda --dtype bfloat16
run chunk_step_wan13b_cuda_bf16 $SF bench chunk --preset wan2.1-t2v-1.3b --device cuda --dtype bfloat16 --repeats 5
run bench_stream_wan13b_cuda_bf16 $SF bench stream --preset wan2.1-t2v-1.3b --device cuda --dtype bfloat16 \
    --latent-size 60,104 --lengths ${WAN_LENGTHS:-1,2} --repeats ${WAN_STREAM_ROUNDS:-1}
if [ -n "${WITH_COMPILE:-}" ]; then
  run chunk_step_wan13b_cuda_bf16_compile $SF bench chunk --preset wan2.1-t2v-1.3b --device cuda --dtype bfloat16 \
      --repeats 5 --compile
  run bench_stream_wan13b_cuda_bf16_flex $SF bench stream --preset wan2.1-t2v-1.3b --device cuda --dtype bfloat16 \
      --latent-size 60,104 --lengths 1 --strategies rolling_kv,recompute --attention flex --repeats 1
fi
