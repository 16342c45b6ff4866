"""Speed of the real train and inference steps: `python -m atlas_jax.benchmark --config=configs/NAME.py`.

The train step is `train.py`'s own (drop path, BatchNorm updates, AdamW, EMA when configured, donation),
run on random images (no data pipeline is imported). Each mode compiles once, warms up, then times
`--steps` steps, each ended with `block_until_ready`, and prints one JSON line (docs/design.md, "Outputs"):
images/s from the median step, compile time, peak memory, model FLOPs per image (matmuls and convolutions
of the float32 forward, counted from its jaxpr: once per inference image, three times per training image,
never the rematerialized recompute), XLA's own count beside it, MFU against the device's dense bf16
peak, and `mesh`, the axis sizes of `config.mesh` (with `mesh.spatial` > 1 every image's rows are split
over that many devices, docs/spatial.md). On GPU each line adds the largest logit difference of the fast
path (config dtype, cuDNN attention) against the float32 XLA path on the same weights and one image, and
whether it is within tolerance.
"""

import collections
import importlib.util
import json
import logging
import math
import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from atlas_jax import config as config_lib
from atlas_jax.errors import one_line_errors

FLAGS = flags.FLAGS

# Dense bf16 peak TFLOP/s per device, by a substring of jax's device_kind (first match wins).
PEAK_TFLOPS = (
  ('H100 PCIe', 756.0),
  ('H100', 989.0),
  ('H200', 989.0),
  ('H800', 989.0),
  ('A100', 312.0),
  ('TPU v6', 918.0),
  ('TPU v5p', 459.0),
  ('TPU v5', 197.0),
  ('TPU v4', 275.0),
)
# x max(1, |logits|). Half precision against float32 (docs/design.md); a float32 fast path runs the same
# arithmetic as the reference, so anything above float32 rounding there is a fault (a tanh GELU moves the
# logits of a small random model by ~4e-5: below bf16's own rounding, caught in float32).
FAST_PATH_TOLERANCE = {'bfloat16': 2e-2, 'float16': 2e-2, 'float32': 1e-5}


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'A config file under configs/.', lock_config=True)
  flags.DEFINE_integer('batch_size', None, "Images per step (default: the config's micro-batch).")
  flags.DEFINE_list('mode', ['train', 'infer'], 'Which steps to time: train, infer or both.')
  flags.DEFINE_integer('steps', 20, 'Timed steps per mode (at least 20 for a reported number).')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
  flags.DEFINE_string('output', None, 'Also append the JSON lines to this file.')
  flags.DEFINE_bool(
    'fast_path',
    True,
    "On GPU, compare the fast path's logits with float32 XLA (two more compilations of the forward).",
  )
  flags.DEFINE_string(
    'profile_dir',
    None,
    'After timing, trace --profile_steps steps of each mode into '
    'DIR/<mode> (TensorBoard/xprof) and print where the device time went.',
  )
  flags.DEFINE_integer('profile_steps', 3, 'Steps traced per mode with --profile_dir.')
  flags.mark_flags_as_required(['config'])


# ---------------------------------------------------------------------------------------------------
# FLOPs.


def _dot_flops(eqn) -> int:
  lhs, rhs = (var.aval.shape for var in eqn.invars[:2])
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params['dimension_numbers']
  batch = math.prod(lhs[d] for d in lhs_batch)
  contract = math.prod(lhs[d] for d in lhs_contract)
  lhs_free = math.prod(size for d, size in enumerate(lhs) if d not in lhs_contract and d not in lhs_batch)
  rhs_free = math.prod(size for d, size in enumerate(rhs) if d not in rhs_contract and d not in rhs_batch)
  return 2 * batch * contract * lhs_free * rhs_free


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  out_elements = math.prod(eqn.outvars[0].aval.shape)
  spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature dim, in feature dim, spatial...)
  kernel_spatial = math.prod(rhs[d] for d in spec[2:])
  return 2 * out_elements * kernel_spatial * rhs[spec[1]]


def jaxpr_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general and convolution, sub-jaxprs included (scan x its length)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      total += _dot_flops(eqn)
    elif eqn.primitive.name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    repeat = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          total += repeat * jaxpr_flops(inner)
  return total


def model_flops_per_image(config) -> int:
  """Forward FLOPs of one image: the float32 XLA-attention model, traced only (nothing compiles)."""
  import jax
  import jax.numpy as jnp

  from atlas_jax.models import build_model

  reference_config = config_lib.resolve(config)
  reference_config.model.attention = 'xla'
  reference_config.model.remat = 'none'
  model = build_model(reference_config, dtype='float32')
  image = jax.ShapeDtypeStruct((1, *config.image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), image)
  return jaxpr_flops(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, image).jaxpr)


def xla_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis['flops']) if analysis and 'flops' in analysis else None


# ---------------------------------------------------------------------------------------------------
# The fast-path check.


def logit_difference(fast_logits, reference_logits, dtype: str = 'bfloat16') -> tuple[float, bool]:
  """(max |fast - reference|, whether it is within FAST_PATH_TOLERANCE[dtype] x max(1, max |reference|))."""
  import numpy as np

  fast_logits = np.asarray(fast_logits, np.float64)
  reference_logits = np.asarray(reference_logits, np.float64)
  difference = float(np.max(np.abs(fast_logits - reference_logits)))
  if not np.all(np.isfinite(fast_logits)):
    return float('inf'), False
  limit = FAST_PATH_TOLERANCE[dtype] * max(1.0, float(np.max(np.abs(reference_logits))))
  return difference, difference <= limit


def fast_path_check(config, params, batch_stats, fast_model=None) -> tuple[float, bool]:
  """Logits of the fast model (the config's dtype and attention) against float32 XLA, same weights."""
  import jax
  import numpy as np

  from atlas_jax import run_setup
  from atlas_jax.models import build_model

  config = config_lib.resolve(config)
  reference_config = config_lib.resolve(config)
  reference_config.model.attention = 'xla'
  reference_model = build_model(reference_config, dtype='float32')
  fast_model = fast_model or build_model(config)
  image = np.random.default_rng(0).standard_normal((1, *config.image_size, 3)).astype(np.float32)
  variables = run_setup.model_variables(params, batch_stats)
  fast = jax.jit(lambda v, x: fast_model.apply(v, x, train=False))(variables, image)
  reference = jax.jit(lambda v, x: reference_model.apply(v, x, train=False))(variables, image)
  return logit_difference(fast, reference, config.model.dtype)


# ---------------------------------------------------------------------------------------------------
# Timing.


def device_description():
  import jax

  device = jax.devices()[0]
  kind = device.device_kind
  peak = next((tflops for name, tflops in PEAK_TFLOPS if name in kind), None)
  return f'{jax.device_count()}x {kind}', peak


def _time_steps(run_step, steps: int, warmup: int) -> list[float]:
  import jax

  for _ in range(warmup):
    jax.block_until_ready(run_step())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run_step())
    times.append(time.perf_counter() - start)
  return times


def device_time_by_op(trace_dir: str, steps: int, top: int = 20) -> dict[str, list[tuple[str, float]]]:
  """The device time of a trace per step, in ms, by XLA op and by kernel (largest `top` of each, plus 'total';
  a kind the trace has no events for is left out).

  Reads the trace's XSpace with jax.profiler.ProfileData (no TensorBoard needed). On GPU/TPU the device
  planes give an 'XLA Ops' line (HLO ops) and stream lines (kernels); on CPU, where there is no device
  plane, XLA's thunks on the host's client threads give the ops, and there are no kernels.
  """
  import glob

  import jax

  paths = sorted(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True))
  if not paths:
    raise FileNotFoundError(f'no *.xplane.pb under {trace_dir}: the trace was not written')
  data = jax.profiler.ProfileData.from_file(paths[-1])
  by_kind = {'ops': collections.Counter(), 'kernels': collections.Counter()}
  planes = [plane for plane in data.planes if plane.name.startswith('/device:')]
  for plane in planes:
    for line in plane.lines:
      if line.name == 'XLA Ops':
        kind = 'ops'
      elif 'Stream' in line.name:
        kind = 'kernels'
      else:
        continue
      for event in line.events:
        by_kind[kind][event.name] += event.duration_ns
  if not planes:  # CPU: the client threads run the compiled program's thunks
    for plane in data.planes:
      for line in plane.lines:
        if line.name.startswith('tf_XLAPjRtCpuClient'):
          for event in line.events:
            if not event.name.startswith('ThreadpoolListener'):
              by_kind['ops'][event.name] += event.duration_ns
    by_kind['kernels'] = by_kind['ops']
  summary = {}
  for kind, durations in by_kind.items():
    if not durations:  # JAX 0.11's GPU traces had no events on 'XLA Ops': report the kernels alone
      continue
    per_step = [(name, total / 1e6 / steps) for name, total in durations.most_common(top)]
    summary[kind] = [('total', sum(durations.values()) / 1e6 / steps)] + per_step
  return summary


def _print_device_time(mode: str, summary) -> None:
  for kind, rows in summary.items():
    total = rows[0][1]
    print(f'# {mode}: device time per step by {kind[:-1]}, {total:.2f} ms in all', file=sys.stderr)
    for name, ms in rows[1:]:
      print(f'#   {ms:9.3f} ms {100 * ms / max(total, 1e-9):5.1f}%  {name[:100]}', file=sys.stderr)


def _peak_memory_gib(compiled) -> float:
  import jax

  stats = jax.devices()[0].memory_stats() if jax.default_backend() != 'cpu' else None
  if stats and 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**30
  memory = compiled.memory_analysis()
  return (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
  ) / 2**30


def _trace(run_step, steps: int, trace_dir: str) -> None:
  import jax

  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      jax.block_until_ready(run_step())


def benchmark(
  config,
  batch_size: int,
  modes,
  steps: int = 20,
  warmup: int = 3,
  config_name: str = '',
  check_fast_path: bool = True,
  profile_dir: str | None = None,
  profile_steps: int = 3,
):
  """Yields one result dict per mode (infer first: its peak memory is not the train step's).

  With `profile_dir`, each mode's timing is followed by a trace of `profile_steps` steps into
  `profile_dir/<mode>` and a summary of its device time on stderr (`device_time_by_op`).
  """
  import jax
  import numpy as np

  from atlas_jax import run_setup, sharding, train

  config = config.copy_and_resolve_references()
  config.batch_size, config.grad_accum_steps = batch_size, 1  # a benchmark step is one micro-batch
  config = config_lib.resolve(config)
  setup = run_setup.train_setup(config)
  mesh, model = setup.mesh, setup.model
  sharding.check_batch_size(batch_size, mesh, '--batch_size')
  device, peak_tflops = device_description()
  flops_forward = model_flops_per_image(config)
  images = np.random.default_rng(0).standard_normal((batch_size, *config.image_size, 3), np.float32)
  labels = np.arange(batch_size, dtype=np.int32) % config.model.num_classes
  common = {
    'config': config_name,
    'model': config.model.name,
    'image_size': list(config.image_size),
    'batch_size': batch_size,
    'device': device,
    'jax_version': jax.__version__,
    'dtype': config.model.dtype,
    'attention': config.model.attention,
    'remat': config.model.remat,
    'peak_tflops': peak_tflops,
    'mesh': {axis: int(size) for axis, size in mesh.shape.items()},  # config.mesh: data, fsdp, spatial
  }

  with jax.set_mesh(mesh):
    state = jax.jit(setup.init, out_shardings=setup.state_sharding)(jax.random.PRNGKey(0))
    batch = sharding.global_batch({'image': images, 'label': labels}, mesh)
    fast_path = {}
    if jax.default_backend() == 'gpu' and check_fast_path:
      difference, ok = fast_path_check(config, state.params, state.batch_stats, model)
      fast_path = {'fast_path_max_logit_diff': difference, 'fast_path_ok': ok}

    for mode in sorted(modes, key=lambda m: m != 'infer'):
      start = time.perf_counter()
      if mode == 'infer':
        forward = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
        variables = run_setup.model_variables(state.params, state.batch_stats)
        compiled = forward.lower(variables, batch['image']).compile()
        compile_s = time.perf_counter() - start
        run_step = lambda: compiled(variables, batch['image'])  # noqa: E731
        times = _time_steps(run_step, steps, warmup)
        flops_per_image = flops_forward
      else:
        step = train.jit_train_step(setup)
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        holder = {'state': state}

        def run_train_step():
          holder['state'], metrics = compiled(holder['state'], batch)
          return metrics

        run_step = run_train_step
        times = _time_steps(run_step, steps, warmup)
        flops_per_image = 3 * flops_forward
      if profile_dir:
        _trace(run_step, profile_steps, f'{profile_dir}/{mode}')
        _print_device_time(mode, device_time_by_op(f'{profile_dir}/{mode}', profile_steps))
      if mode == 'train':
        state = holder['state']
      step_s = statistics.median(times)
      images_per_s = batch_size / step_s
      measured_xla = xla_flops(compiled)
      result = {
        **common,
        'mode': mode,
        'images_per_s': round(images_per_s, 2),
        'step_ms_median': round(1e3 * step_s, 2),
        'compile_s': round(compile_s, 1),
        'peak_mem_gib': float(f'{_peak_memory_gib(compiled):.4g}'),
        'model_flops_per_image': flops_per_image,
        'xla_flops_per_image': None if measured_xla is None else measured_xla / batch_size * mesh.size,
        'mfu': (
          None
          if peak_tflops is None
          else round(images_per_s * flops_per_image / (peak_tflops * 1e12 * jax.device_count()), 4)
        ),
        **fast_path,
      }
      yield result


# JAX probes for a TPU at its first backend call and logs the failure at INFO; on a machine without one that
# line says nothing. Kept where a TPU may be: libtpu installed, or a TPU device node.
_NO_TPU_MESSAGE = "Unable to initialize backend 'tpu'"


class _DropNoTpuLine(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_NO_TPU_MESSAGE)


def _quiet_tpu_probe() -> None:
  """Drops JAX's 'Unable to initialize backend 'tpu'' INFO line unless this machine may have a TPU."""
  may_have_tpu = (
    importlib.util.find_spec('libtpu') is not None
    or os.path.exists('/dev/accel0')
    or os.path.exists('/dev/vfio/0')
  )
  if not may_have_tpu:
    logging.getLogger('jax._src.xla_bridge').addFilter(_DropNoTpuLine())


@one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  _quiet_tpu_probe()
  import jax

  config = config_lib.resolve(FLAGS.config)
  if config.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache_dir))
  unknown = set(FLAGS.mode) - {'train', 'infer'}
  if unknown or not FLAGS.mode:
    raise app.UsageError(f'--mode takes train, infer or both, got {",".join(FLAGS.mode)}')
  if FLAGS.steps < 1 or FLAGS.warmup < 0:
    raise app.UsageError('--steps must be >= 1 and --warmup >= 0')
  batch_size = FLAGS.batch_size or config.batch_size // config.grad_accum_steps
  config_name = next((arg.split('=', 1)[1] for arg in sys.argv if arg.startswith('--config=')), '')
  for result in benchmark(
    config,
    batch_size,
    FLAGS.mode,
    FLAGS.steps,
    FLAGS.warmup,
    config_name,
    FLAGS.fast_path,
    FLAGS.profile_dir,
    FLAGS.profile_steps,
  ):
    line = json.dumps(result)
    print(line, flush=True)
    if FLAGS.output:
      with open(FLAGS.output, 'a') as file:
        file.write(line + '\n')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)  # command-line mistakes: one line
