#!/usr/bin/env bash
# Atlas-B at 2048 px on a Cloud TPU v5p-64 slice (8 hosts x 4 chips): the same command on every host.
# NOT RUN HERE (no TPU in this project's CI); it uses only what tests/test_multihost.py checks on CPU.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a BUCKET=my-bucket REPO=<your clone's git URL> bash experiments/launch/tpu_pod.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (a GCS bucket name)}" "${REPO:?set REPO}"
on_every_host() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }
# The workdir is one place every host sees (checkpoints are written collectively): gs://$BUCKET/..., written
# directly (atlas_jax[gcs]: google-cloud-storage and gcsfs; the TPU VM's service account is the credential).
# The dataset is read straight from the bucket (data.data_dir=gs://...): nothing is copied here. Each host
# downloads the shards of the splits it reads, once, into its local cache (ATLAS_JAX_GCS_CACHE, default
# ~/.cache/atlas_jax/gcs; it needs the dataset's size in free disk) and reuses them on a restart.
# The compilation cache is in the bucket too, shared by the hosts and by every later run.
DATA_DIR="${DATA_DIR:-gs://$BUCKET/tensorflow_datasets}"
CACHE_DIR="${CACHE_DIR:-gs://$BUCKET/xla_cache}"
on_every_host "
  set -e
  [ -d atlas_jax ] || git clone $REPO atlas_jax
  cd atlas_jax && python3 -m pip install -q -r requirements.txt 'jax[tpu]' 'google-cloud-storage>=3.0,<4' 'gcsfs>=2025.3' \
    && python3 -m pip install -q --no-deps -e ."
# First check that the step fits: compiles for the pod's mesh without data, prints the memory per chip.
on_every_host "
  cd atlas_jax && python3 -m atlas_jax.main --config=configs/atlas_b_2048.py --config.mode=compile \
    --config.mesh.fsdp=4 --config.compilation_cache_dir=$CACHE_DIR --workdir=/tmp/atlas_compile --multihost"
# Train. --multihost: jax.distributed finds the other hosts from the TPU metadata. A maintenance event sends
# SIGTERM; the hosts agree within checkpoint.preemption_sync_steps, save the same step and exit 0; running
# this line again resumes.
on_every_host "
  cd atlas_jax && nohup python3 -m atlas_jax.main --config=configs/atlas_b_2048.py \
    --config.data.data_dir=$DATA_DIR --config.compilation_cache_dir=$CACHE_DIR --config.mesh.fsdp=4 \
    --workdir=gs://$BUCKET/atlas_runs/atlas_b_2048 --multihost > train.log 2>&1 &"
