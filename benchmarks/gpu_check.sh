#!/usr/bin/env bash
# The short GPU check (about 5 minutes on one H100): sampling ratios through ComfyUI, then the training step.
#   COMFYUI_PATH=/path/to/ComfyUI bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. per-layer host cost on the GPU (tiny tensors: launch-bound);
# 2. ComfyUI sampler, SD1.5 512 px then SDXL 1024 px: plain, default (warm), default_cold, buckets, mask off;
# 3. the training step against the plain adapter step (fused AdamW), last: the parts that finish leave their JSON.
# 2 and 3 also profile one run of plain and default (adapter and CustomContrast): GPU kernel time against wall
# time ("device_busy" in the JSON) says whether the GPU or the host (Python, launches) sets the pace of each.
# The time limits add up to 490 s: one device call of 600 s, with the install before it.
source "$(dirname "$0")/bench_env.sh" "$@"
run 50 benchmarks.bench_layer_overhead --device cuda --evaluations 20 --out "$out/layer_overhead_cuda.json"
if [ -n "${COMFYUI_PATH:-}" ]; then
    run 160 benchmarks.bench_comfy --families sd15 --repeats 3 --out "$out/comfy_sd15_gpu.json"
    run 180 benchmarks.bench_comfy --families sdxl --repeats 2 --out "$out/comfy_sdxl_gpu.json"
fi
run 100 benchmarks.bench_training --repeats 3 --out "$out/training_fused_adamw.json"
