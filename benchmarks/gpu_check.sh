#!/usr/bin/env bash
# The short GPU check (about 5 minutes on one H100): CUDA-graph mode against eager, then sampling ratios.
#   COMFYUI_PATH=/path/to/ComfyUI bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. per-layer cost on the GPU (tiny tensors: launch-bound) with graphs off / on, and max |graphs - eager|;
# 2. the CUDA tests of the graph mode when pytest is installed;
# 3. ComfyUI sampler, SD1.5 512 px then SDXL 1024 px: plain, default (warm), default_cold, buckets, mask off,
#    and default and buckets with graphs;
# 4. the training step against the plain adapter step (fused AdamW), eager and with the frozen encoders as CUDA
#    graphs, last: the parts that finish leave their JSON.
# 3 and 4 also profile one run of plain and default (adapter and CustomContrast): GPU kernel time against wall
# time ("device_busy" in the JSON) says whether the GPU or the host (Python, launches) sets the pace of each.
# The time limits add up to 540 s: one device call of 600 s, with the install before it.
source "$(dirname "$0")/bench_env.sh" "$@"
run 50 benchmarks.bench_layer_overhead --device cuda --evaluations 20 --out "$out/layer_overhead_cuda.json"
if "$py" -m pytest --version >/dev/null 2>&1; then
    run 50 pytest -q -p no:cacheprovider tests/test_patch_graphs.py
fi
if [ -n "${COMFYUI_PATH:-}" ]; then
    run 160 benchmarks.bench_comfy --families sd15 --repeats 3 --out "$out/comfy_sd15_graphs.json"
    run 180 benchmarks.bench_comfy --families sdxl --repeats 2 --out "$out/comfy_sdxl_graphs.json"
fi
run 100 benchmarks.bench_training --repeats 3 --cuda-graphs --out "$out/training_fused_adamw.json"
