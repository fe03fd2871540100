#!/usr/bin/env bash
# Run every benchmark on the CUDA device with sizes that finish in under 8 minutes on one recent GPU.
# Usage: bash benchmarks/run_gpu.sh [python]    (results: benchmarks/results/gpu_*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
OUT=benchmarks/results
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader || true
common=(--device cuda --wait-retries 0)
start=$(date +%s)
# 1. training: bundle vs plain, fp32 vs AMP (float16 autocast + channels_last), 128 and 224 px
timeout 200 "$PY" benchmarks/train_throughput.py "${common[@]}" --sizes 128 224 --batch 32 --warmup 3 --iters 10 \
    --rounds 2 --out "$OUT/gpu_train_throughput.json"
# 2. inference and Grad-CAM latency per ROI, 1 and 5 members, 224 and 512 px (one subprocess each)
timeout 150 "$PY" benchmarks/inference_latency.py "${common[@]}" --sizes 224 512 --members 1 5 \
    --modes predict cam cam_bf16 --warmup 3 --reps 10 --out "$OUT/gpu_inference_latency.json"
# 3. scaling of preparation and epochs (the data path runs on the host's cores)
timeout 150 "$PY" benchmarks/scaling.py "${common[@]}" --counts 100 1000 10000 --workers 8 \
    --persistent-epochs 2 --out "$OUT/gpu_scaling.json"
# 4. files to tensors (CPU work; compared with the GPU training throughput measured above)
timeout 60 "$PY" benchmarks/data_path.py "${common[@]}" --n-roi 200 --n-full 2 \
    --train-json "$OUT/gpu_train_throughput.json" --out "$OUT/gpu_data_path.json"
echo "all GPU benchmarks done in $(( $(date +%s) - start )) s"
