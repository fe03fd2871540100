#!/usr/bin/env bash
# Run every benchmark on the CUDA device on one recent GPU; each step has a time cap (a step that hits it is
# reported and the next one runs), so the whole run takes at most the caps' sum, about 11 minutes. Training and inference are measured for the
# paper's network (resnext50_32x4d) and for the bundle's default backbone (efficientnet_lite0).
# Usage: bash benchmarks/run_gpu.sh [python]    (results: benchmarks/results/gpu_*.json)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
OUT=benchmarks/results
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader || true
common=(--device cuda --wait-retries 0)
start=$(date +%s)
step() {  # step <seconds> <name> <args...>
    local cap=$1 name=$2
    shift 2
    echo "== $name (cap ${cap} s)"
    timeout "$cap" "$PY" -m "benchmarks.$name" "${common[@]}" "$@" || echo "== $name did not finish (exit $?)"
}
# 1. training: bundle vs plain, fp32 vs AMP (bfloat16 autocast + channels_last), 128 and 224 px
step 150 train_throughput --arch resnext50_32x4d --precisions fp32 amp --sizes 128 224 --batch 32 --warmup 3 \
    --iters 10 --rounds 2 --out "$OUT/gpu_train_throughput.json"
# 1b. the same for efficientnet_lite0, with fp32 + channels_last as a third precision
step 120 train_throughput --arch efficientnet_lite0 --precisions fp32 fp32_cl amp --sizes 128 224 --batch 32 \
    --warmup 3 --iters 10 --rounds 2 --out "$OUT/gpu_train_throughput_efficientnet_lite0.json"
# 2. inference and Grad-CAM latency per ROI, 1 and 5 members, 224 and 512 px (one subprocess each)
step 120 inference_latency --arch resnext50_32x4d --sizes 224 512 --members 1 5 --modes predict cam cam_amp \
    --warmup 3 --reps 10 --out "$OUT/gpu_inference_latency.json"
# 2b. efficientnet_lite0: the three inference precisions and Grad-CAM, 128 and 224 px
step 90 inference_latency --arch efficientnet_lite0 --sizes 128 224 --members 1 5 \
    --modes predict predict_fp32 predict_fp32_nocl cam cam_amp --warmup 3 --reps 10 \
    --out "$OUT/gpu_inference_latency_efficientnet_lite0.json"
# 3. scaling of preparation and epochs (preparation and augmentation run on the host's cores)
step 150 scaling --counts 100 1000 10000 --workers 8 --out "$OUT/gpu_scaling.json"
# 4. files to tensors (host work), compared with the GPU training throughput measured above
step 50 data_path --n-roi 100 --n-full 2 --train-json "$OUT/gpu_train_throughput.json" \
    --out "$OUT/gpu_data_path.json"
echo "GPU benchmarks done in $(($(date +%s) - start)) s; tables: $PY -m benchmarks.report $OUT/gpu_*.json"
