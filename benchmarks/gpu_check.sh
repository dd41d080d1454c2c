#!/usr/bin/env bash
# The GPU check, for a machine with one or more CUDA GPUs (7 to 8 minutes on one, by estimate:
# it has not run on a GPU yet):
#   1. the gpu-marked tests;
#   2. ViT-B-32 (random init, 224 px) on the synthetic images for one epoch of 50 steps at batch
#      256 with --precision amp_bf16, and OpenCLIP's own trainer on the same JPEG files, batch and
#      precision, eager and compiled (clipse --compile, OpenCLIP --torchcompile): samples/s and the ratios
#      (benchmarks/openclip_throughput.py, which also writes OUT_DIR/throughput_*.csv);
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
rm -rf "$OUT/one" "$OUT/nproc"   # a rerun measures afresh
export CLIPSE_CACHE=${CLIPSE_CACHE:-$OUT/cache}
REPORT="$OUT/gpu_check.txt"
: > "$REPORT"
say() { echo "$@" | tee -a "$REPORT"; }

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    | tee -a "$REPORT"

say "== gpu-marked tests"
python -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -3 | tee -a "$REPORT" || true  # failures are reported; the figures still come

# 2,560 images x 5 captions = 12,800 pairs = 50 steps of 256; the first steps (and compilation)
# are left out of the timing by --skip. The JPEG files are stored at the generator's 64 px (eager
# and compiled, each against OpenCLIP's trainer run the same way) and at a Flickr8k photo's
# 500x375 (eager against OpenCLIP: what each trainer pays for decoding differs). A failed step is
# reported and the check goes on.
THROUGHPUT=(python benchmarks/openclip_throughput.py --model ViT-B-32 --train-images 2560 --batch-size 256
            --precision amp_bf16 --device cuda --rounds 1 --skip 10 --workers 8)
say "== ViT-B-32, batch 256, amp_bf16, 12,800 pairs of 64-px files: clipse and OpenCLIP's trainer, eager and compiled"
"${THROUGHPUT[@]}" --compile --source-sizes 64x64 --out "$OUT/throughput_64.csv" 2>&1 | tee -a "$REPORT" \
    || say "openclip_throughput.py failed (above)"
say "== the same with 500x375 files: clipse (eager) and OpenCLIP's trainer"
"${THROUGHPUT[@]}" --source-sizes 500x375 --out "$OUT/throughput_500.csv" 2>&1 | tee -a "$REPORT" \
    || say "openclip_throughput.py failed (above)"

say "== bare loop on the GPU (default model and batch)"
python benchmarks/bare_loop.py --device cuda --rounds 3 2>&1 | tail -1 | tee -a "$REPORT" || say "bare_loop.py failed"
say "== micro-batching on the GPU (clipse-small)"
python benchmarks/micro_batch.py --device cuda --steps 8 2>&1 | tail -5 | tee -a "$REPORT" || say "micro_batch.py failed"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
    say "== ViT-B-32, batch 256, amp_bf16, 12,800 pairs: one GPU against --nproc $GPUS"
    COMMON=(--model ViT-B-32 --shapes-train-images 2560 --shapes-val-images 50 --shapes-test-images 50
            --batch-size 256 --epochs 1 --precision amp_bf16 --device cuda --no-progress
            --registry "$OUT/registry.csv")
    median_rate() {  # median samples/s of training.csv rows whose window starts after 10 steps
        python -c "import sys, pandas as pd; rows = pd.read_csv(sys.argv[1] + '/training.csv')
print(round(rows.loc[rows['step'].shift(fill_value=0) >= 10, 'samples_per_s'].median(), 1))" "$1"
    }
    python -m clipse.train "${COMMON[@]}" --run-dir "$OUT/one" >/dev/null
    python -m clipse.train "${COMMON[@]}" --nproc "$GPUS" --run-dir "$OUT/nproc" >/dev/null
    say "clipse --nproc $GPUS  $(median_rate "$OUT/nproc") samples/s (one GPU: $(median_rate "$OUT/one"))"
else
    say "== --nproc: one GPU here, nothing to compare"
fi
say "figures: $REPORT"
