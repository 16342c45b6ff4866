#!/usr/bin/env bash
# The H100 rows of docs/performance.md, one benchmark process per row, each under its own time limit.
# Run from the repository root: bash experiments/speed/run_h100.sh OUT_DIR
# (On the lent GPU machine ml_collections is missing: install its wheel first, see docs/performance.md.)
set -u
out=${1:-/tmp/atlas_speed}
source "$(dirname "$0")/common.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
# 1024 px first, with a 3-step trace of each mode summarised by XLA op and by kernel.
row 170 atlas_b_1024_bs32 --config=configs/atlas_b_1024.py --batch_size=32 --mode=train,infer \
  --profile_dir="$scratch/trace_1024"
# 4096 px: remat of every MSA block and every stem unit (model.remat=block).
row 190 atlas_b_4096_bs8_remat --config=configs/atlas_b_4096.py --batch_size=8 --mode=train \
  --config.model.remat=block --fast_path=false
row 150 atlas_b_4096_d2_10_bs8_remat --config=configs/atlas_b_4096.py --batch_size=8 --mode=train \
  --config.model.remat=block --config.model.depths='(2,10)' --fast_path=false
row 70 atlas_b_4096_bs8_infer --config=configs/atlas_b_4096.py --batch_size=8 --mode=infer --fast_path=false
