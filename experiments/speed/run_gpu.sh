#!/usr/bin/env bash
# The long-context GPU rows of docs/performance.md (issue 16), 4096 px first, one benchmark process per row,
# each under its own time limit, then the same rows again warm from the compilation cache.
# Run from the repository root: bash experiments/speed/run_gpu.sh OUT_DIR
# (On the lent GPU machine ml_collections is missing: install its wheel first, see docs/performance.md.)
set -u
out=${1:-/tmp/atlas_speed}
source "$(dirname "$0")/common.sh"
rm -rf "$scratch/xla_cache"  # cold compiles: nothing cached from an earlier run
rows() {  # rows SUFFIX: every row once
  row 120 "atlas_b_4096_bs8_remat_train$1" --config=configs/atlas_b_4096.py --batch_size=8 --mode=train \
    --config.model.remat=block --fast_path=false
  row 60 "atlas_b_4096_bs8_infer$1" --config=configs/atlas_b_4096.py --batch_size=8 --mode=infer --fast_path=false
  row 90 "atlas_s_2048_bs16$1" --config=configs/atlas_s_2048.py --batch_size=16 --mode=train,infer \
    --config.model.remat=block
  row 90 "atlas_b_1024_bs32$1" --config=configs/atlas_b_1024.py --batch_size=32 --mode=train,infer
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
rows _cold
rows _warm
