"""Test-wide settings: XLA's CPU backend without its slow optimisation passes, and one compilation cache.

The tests compile many small graphs, and compiling is most of the suite's time: at optimisation level 0 and
with the CPU fusion emitters off (XLA's older loop emitters generate the fused kernels) XLA compiles them
about twice as fast (the conv-stem train step of tests/spatial_check.py: 14.0 s by default, 9.8 s at level
0, 4.6 to 6.1 s with the emitters off too), and the results are the same numbers to the tests' tolerances
(parity tolerances are unchanged). Subprocesses inherit the flags through the environment.

Many tests compile the same programs: the same tiny model in several test modules, and the same training
run in every subprocess of the command-line tests (a run, its resumed twin, the other host). A persistent
compilation cache private to this test session, set through the environment, serves them all: the pytest
workers and every subprocess they start inherit it, and the session removes it at the end. An executable
from the cache is the one a fresh compile makes, so no result changes.
"""

import os
import shutil
import tempfile
import uuid

for _flag in ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false'):
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_flag}'.strip()

# The first process of the session (pytest itself, before it starts any xdist worker) names the session;
# the workers and subprocesses inherit the name through the environment.
_SESSION = os.environ.setdefault('ATLAS_JAX_TEST_SESSION', uuid.uuid4().hex)
CACHE_DIR = os.path.join(tempfile.gettempdir(), f'atlas_jax_test_xla_cache_{_SESSION}')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', CACHE_DIR)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# What the pytest workers of one session share besides compiled programs (e.g. a trained workdir).
SHARED_DIR = os.path.join(tempfile.gettempdir(), f'atlas_jax_test_shared_{_SESSION}')


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  if not hasattr(session.config, 'workerinput'):  # the controller (or a plain run), after every worker
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
    shutil.rmtree(SHARED_DIR, ignore_errors=True)


from tests.gcs_server import gcs_dir, gcs_server  # noqa: E402,F401  (fixtures: a fake-gcs-server per session)
