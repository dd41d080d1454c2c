#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU (about 8 minutes on one):
#   1. the gpu-marked tests;
#   2. ViT-B-32 (random init) on 224-px synthetic images for a fixed number of steps at batch 256
#      with --precision amp_bf16, without and with --compile, and OpenCLIP's own trainer on the
#      same data, batch and precision: samples/s and the ratios;
#   3. the bare-loop comparison on the GPU;
#   4. micro-batching on the GPU: batch 1,024 with --micro-batch 128 against plain batches
#      (peak memory allocated and samples/s, benchmarks/micro_batch.py), and, with 2 or more
#      GPUs, ViT-B-32 at batch 256 over --nproc N (every GPU) against one.
# Usage: benchmarks/gpu_check.sh [OUT_DIR]     (figures also go to OUT_DIR/gpu_check.txt)
# Needs: pip install -e '.[test,bench]' (OpenCLIP's trainer needs the bench extra).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${1:-gpu_check}"
OUT=$(cd "${1:-gpu_check}" && pwd)   # absolute: OpenCLIP's trainer runs in another folder
rm -rf "$OUT/warm" "$OUT/eager" "$OUT/compiled" "$OUT/nproc"   # a rerun measures afresh
export CLIPSE_CACHE=${CLIPSE_CACHE:-$OUT/cache}
REPORT="$OUT/gpu_check.txt"
: > "$REPORT"
say() { echo "$@" | tee -a "$REPORT"; }

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    | tee -a "$REPORT"

say "== gpu-marked tests"
python -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -3 | tee -a "$REPORT" || true  # failures are reported; the figures still come

# 2,560 images x 5 captions = 12,800 pairs = 50 steps of 256; the first steps (and compilation)
# are left out of the median by --skip.
IMAGES=2560
STEPS_SKIP=10
COMMON=(--model ViT-B-32 --shapes-train-images $IMAGES --shapes-val-images 50 --shapes-test-images 50
        --batch-size 256 --epochs 1 --log-every 1 --precision amp_bf16 --device cuda --no-progress
        --registry "$OUT/registry.csv")

median_rate() {  # median samples/s of training.csv rows after the warm-up
    python - "$1" "$STEPS_SKIP" <<'EOF'
import sys, statistics, pandas as pd
rates = pd.read_csv(sys.argv[1] + "/training.csv")["samples_per_s"].tolist()[int(sys.argv[2]):]
print(f"{statistics.median(rates):.1f}")
EOF
}

say "== ViT-B-32, batch 256, amp_bf16, $((IMAGES * 5)) pairs"
python -m clipse.train "${COMMON[@]}" --run-dir "$OUT/warm" >/dev/null  # decodes the images once; not timed
python -m clipse.train "${COMMON[@]}" --run-dir "$OUT/eager" >/dev/null
EAGER=$(median_rate "$OUT/eager")
python -m clipse.train "${COMMON[@]}" --compile --run-dir "$OUT/compiled" >/dev/null
COMPILED=$(median_rate "$OUT/compiled")
say "clipse eager     $EAGER samples/s"
say "clipse compiled  $COMPILED samples/s"

say "== OpenCLIP's trainer on the same images, batch and precision"
OPENCLIP=$(python benchmarks/openclip_throughput.py --model ViT-B-32 --train-images $IMAGES --batch-size 256 \
    --precision amp_bf16 --device cuda --rounds 1 --skip $STEPS_SKIP --workers 8 | tee -a "$REPORT" \
    | sed -n 's/^OpenCLIP *\([0-9.]*\) samples\/s/\1/p')
python - "$EAGER" "$COMPILED" "$OPENCLIP" <<'EOF' | tee -a "$REPORT"
import sys
eager, compiled, openclip = map(float, sys.argv[1:])
print(f"clipse eager / OpenCLIP {eager / openclip:.2f}x; clipse compiled / OpenCLIP {compiled / openclip:.2f}x; "
      f"compiled / eager {compiled / eager:.2f}x")
EOF

say "== bare loop on the GPU (default model and batch)"
python benchmarks/bare_loop.py --device cuda --rounds 3 2>/dev/null | tail -1 | tee -a "$REPORT"
say "== micro-batching on the GPU (clipse-small)"
python benchmarks/micro_batch.py --device cuda --steps 8 2>/dev/null | tail -5 | tee -a "$REPORT"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
    say "== ViT-B-32, batch 256 over --nproc $GPUS"
    python -m clipse.train "${COMMON[@]}" --nproc "$GPUS" --run-dir "$OUT/nproc" >/dev/null
    say "clipse --nproc $GPUS  $(median_rate "$OUT/nproc") samples/s (one GPU: $EAGER)"
else
    say "== --nproc: one GPU here, nothing to compare"
fi
say "figures: $REPORT"
