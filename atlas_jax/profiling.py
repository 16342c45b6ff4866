"""Profiler traces into WORKDIR/profile/, a local workdir or a gs:// one.

`start_trace(workdir)` and `stop_trace()` wrap `jax.profiler.start_trace` / `stop_trace`; like them, one
trace at a time per process. On a local workdir they trace straight into WORKDIR/profile, as before. JAX's
profiler writes through its own C++ file layer, which has no Cloud Storage backend without TensorFlow (a
gs:// log dir fails or writes nothing), so for a gs:// workdir the trace goes to a local temporary folder
and, after `stop_trace`, every file of it is uploaded to WORKDIR/profile/ at the same relative path: the
layout TensorBoard's profile plugin reads, `plugins/profile/<run>/<host>.xplane.pb`. Each host of a pod
uploads its own `<host>.xplane.pb`, so hosts do not overwrite each other.
"""

import shutil
import tempfile

import jax

from atlas_jax import storage

_staging: tuple[str, str] | None = None  # (the local folder traced into, the gs:// profile folder)


def start_trace(workdir) -> None:
  """Starts tracing into WORKDIR/profile (through a local folder when the workdir is on gs://)."""
  global _staging
  target = storage.join(workdir, 'profile')
  if not storage.is_remote(workdir):
    jax.profiler.start_trace(str(target))
    return
  local = tempfile.mkdtemp(prefix='atlas_jax_profile_')
  jax.profiler.start_trace(local)
  _staging = (local, str(target))


def stop_trace() -> None:
  """Stops the trace; for a gs:// workdir uploads its files into WORKDIR/profile/ and removes the local
  folder."""
  global _staging
  jax.profiler.stop_trace()
  if _staging is None:
    return
  local, target = _staging
  _staging = None
  try:
    storage.upload_tree(local, target)
  finally:
    shutil.rmtree(local, ignore_errors=True)
