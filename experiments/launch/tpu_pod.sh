#!/usr/bin/env bash
# Atlas-B at 2048 px on a Cloud TPU v5p-64 slice (8 hosts x 4 chips): the same command on every host.
# NOT RUN HERE (no TPU in this project's CI); it uses only what tests/test_multihost.py checks on CPU.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a BUCKET=my-bucket REPO=<your clone's git URL> bash experiments/launch/tpu_pod.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (a GCS bucket name)}" "${REPO:?set REPO}"
on_every_host() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }
# The workdir must be one directory every host sees (checkpoints are written collectively) and atlas_jax
# writes it through the local filesystem: mount the bucket with gcsfuse at the same path on every host.
on_every_host "
  set -e
  mkdir -p \$HOME/bucket && (mountpoint -q \$HOME/bucket || gcsfuse --implicit-dirs $BUCKET \$HOME/bucket)
  [ -d atlas_jax ] || git clone $REPO atlas_jax
  cd atlas_jax && python3 -m pip install -q -r requirements.txt 'jax[tpu]' && python3 -m pip install -q --no-deps -e ."
# First check that the step fits: compiles for the pod's mesh without data, prints the memory per chip.
on_every_host "
  cd atlas_jax && python3 -m atlas_jax.main --config=configs/atlas_b_2048.py --config.mode=compile \
    --config.mesh.fsdp=4 --workdir=/tmp/atlas_compile --multihost"
# Train. --multihost: jax.distributed finds the other hosts from the TPU metadata. A maintenance event sends
# SIGTERM; the hosts agree within checkpoint.preemption_sync_steps, save the same step and exit 0; running
# this line again resumes.
on_every_host "
  cd atlas_jax && nohup python3 -m atlas_jax.main --config=configs/atlas_b_2048.py \
    --config.data.data_dir=\$HOME/bucket/tensorflow_datasets --config.mesh.fsdp=4 \
    --workdir=\$HOME/bucket/atlas_runs/atlas_b_2048 --multihost > train.log 2>&1 &"
