#!/usr/bin/env bash
# Runs every benchmark at the target settings and writes JSON (and a log) into OUT_DIR.
#   bash benchmarks/run_all.sh [OUT_DIR]        # COMFYUI_PATH set: the ComfyUI-sampler benchmarks run too
# Each benchmark has its own time limit, so one failure does not stop the others.
source "$(dirname "$0")/bench_env.sh" "$@"
if [ -n "${COMFYUI_PATH:-}" ]; then
    run 110 benchmarks.bench_comfy --families sd15 --repeats 5 --out "$out/comfy_sd15.json"
fi
run 150 benchmarks.bench_training --repeats 5 --out "$out/training.json"
if [ -n "${COMFYUI_PATH:-}" ]; then
    run 190 benchmarks.bench_comfy --families sdxl --repeats 2 --out "$out/comfy_sdxl.json"
fi
run 45 benchmarks.bench_encode --out "$out/encode.json"
run 120 benchmarks.bench_layer_overhead --out "$out/layer_overhead_cpu.json"
run 90 benchmarks.bench_sampling --repeats 3 --out "$out/sampling_processors.json"
