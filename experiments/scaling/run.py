"""Figure 1a (cost against resolution): training step time and memory of Atlas, ViT and WindowViT.

python experiments/scaling/run.py [--models=atlas,vit,window_vit] [--max_resolution=4096]
    [--max_memory_gib=8] [--point_time_limit_s=300] [--output=DIR] [--quick]

One small model per family (Atlas-T widths: dim 192, 3 heads; 6 MSA blocks in all, split over the stages
like the default depths: (6), (2, 4), (2, 2, 2), (1, 1, 1, 3); a patchify stem with patch 8, windows of
16 x 16 tokens, a 4 x 4 pool), batch 1, the real train step of `atlas_jax.train` (forward, backward, AdamW,
the reference recipe's Mixup/CutMix), at 128, 256, 512, ... px. Every point runs in its own
process: it compiles the train step, reads XLA's `memory_analysis`, and only when that fits under
--max_memory_gib (on an accelerator: 90% of the device's memory unless given) runs --warmup + --steps
steps and times them. A model's curve stops at the first point that does not fit, that runs past
--point_time_limit_s, or whose predicted time (the last step time x the growth in tokens) would.
On a GPU the same command reaches 4096 px. Writes under --output (default: this folder) points.csv (with
each step's model FLOPs, which no load on a shared machine changes) and scaling.png (measured curves beside
ideal O(N log N) and O(N^2) lines, N = tokens).
`--quick` measures a tiny model at 128 px in seconds (a smoke test, not a result).
"""

import argparse
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from experiments import common  # noqa: E402 (after the path is set)

MODELS = ('atlas', 'vit', 'window_vit')
RESULT_PREFIX = 'scaling point: '
FIELDS = [
  'model',
  'resolution',
  'tokens',
  'scales',
  'depths',
  'status',
  'step_s_median',
  'train_gflops',
  'compile_s',
  'memory_analysis_gib',
  'peak_process_gib',
  'device',
  'note',
]
TOTAL_BLOCKS, QUICK_TOTAL_BLOCKS = 6, 1


def split_depths(num_scales: int, total_blocks: int) -> tuple[int, ...]:
  """`total_blocks` over `num_scales` stages: 2 per stage before the last when that leaves it 2, else 1."""
  per_stage = 2 if total_blocks - 2 * (num_scales - 1) >= 2 else 1
  last = total_blocks - per_stage * (num_scales - 1)
  if last < 1:
    raise common.ExperimentError(f'{total_blocks} blocks cannot cover {num_scales} scales')
  return (per_stage,) * (num_scales - 1) + (last,)


def point_config(model: str, resolution: int, quick: bool, accelerator: bool):
  """The config of one point: Atlas-T widths (tiny under --quick), patch 8, 16 x 16 windows, pool 4."""
  from atlas_jax.models import layout
  from configs import common as config_common

  config = config_common.base_config('T', resolution)
  config.model.update(
    name=model,
    patch_size=8,
    window=16,
    pool=4,
    drop_path_rate=0.0,
    # XLA's CPU backend runs bfloat16 matmuls slower than float32
    dtype='bfloat16' if accelerator else 'float32',
  )
  if quick:
    config.model.update(dim=16, num_heads=1, stem_width=8)
  # The baselines run every block on the finest scale alone.
  num_scales = len(layout.check_image_size((resolution, resolution), 8, 16, 4)) if model == 'atlas' else 1
  total = QUICK_TOTAL_BLOCKS if quick else TOTAL_BLOCKS
  config.model.depths = split_depths(num_scales, total)
  config.batch_size, config.grad_accum_steps = 1, 1
  # Random images at the full resolution: on a real source the step would take the loader's capped size
  # and upsample it on the device (train.loader_image_size), which is not the model's cost.
  config.data.source = 'synthetic'
  config.compilation_cache_dir = ''  # each point compiles once; a cache would only fill the disk
  return config, num_scales


def measure_point(args) -> dict:
  """In the point's own process: compile, check the memory, time the steps. One result dict."""
  import jax
  import numpy as np

  from atlas_jax import benchmark, run_setup, sharding, train
  from atlas_jax import config as config_lib

  accelerator = jax.default_backend() != 'cpu'
  config, num_scales = point_config(args.model, args.resolution, args.quick, accelerator)
  config = config_lib.resolve(config)
  tokens = (args.resolution // config.model.patch_size) ** 2
  device = jax.devices()[0]
  result = {
    'model': args.model,
    'resolution': args.resolution,
    'tokens': tokens,
    'scales': num_scales,
    'depths': ' '.join(map(str, config.model.depths)),
    'device': device.device_kind,
  }
  limit_gib = args.max_memory_gib
  if limit_gib is None:
    stats = device.memory_stats() if accelerator else None
    limit_gib = 0.9 * stats['bytes_limit'] / 2**30 if stats and 'bytes_limit' in stats else 8.0
  setup = run_setup.train_setup(config)
  mesh = setup.mesh
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = (
      train.jit_train_step(setup)
      .lower(setup.abstract_state, train.abstract_batch(config, config.batch_size))
      .compile()
    )
    result['compile_s'] = round(time.perf_counter() - start, 1)
    memory = compiled.memory_analysis()
    # Donated state aliases its output, so it counts once (as `--config.mode=compile` reports it).
    need_gib = (
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      - memory.alias_size_in_bytes
      + memory.temp_size_in_bytes
    ) / 2**30
    result['memory_analysis_gib'] = round(need_gib, 4)
    if need_gib > limit_gib:
      return {**result, 'status': 'over_memory', 'note': f'needs {need_gib:.2f} GiB > {limit_gib:.2f} GiB'}
    state = jax.jit(setup.init, out_shardings=setup.state_sharding)(jax.random.PRNGKey(0))
    images = np.random.default_rng(0).standard_normal((1, args.resolution, args.resolution, 3), np.float32)
    batch = sharding.global_batch({'image': images, 'label': np.zeros((1,), np.int32)}, mesh)
    times = []
    for index in range(args.warmup + args.steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      if index >= args.warmup:
        times.append(time.perf_counter() - start)
  if accelerator:
    peak = device.memory_stats().get('peak_bytes_in_use', 0) / 2**30
  else:  # ru_maxrss is in KiB on Linux: the whole process, JAX and Python included
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  # Model FLOPs of the step (3 x the forward's matmuls and convolutions, counted from its jaxpr): the cost
  # no other process's load changes.
  train_gflops = 3 * benchmark.model_flops_per_image(config) * config.batch_size / 1e9
  return {
    **result,
    'status': 'ok',
    'step_s_median': round(statistics.median(times), 4),
    'train_gflops': round(train_gflops, 3),
    'peak_process_gib': round(peak, 3),
    'note': f'{args.steps} timed steps after {args.warmup} warmup',
  }


def run_point(args, model: str, resolution: int) -> dict:
  """Runs one point in a child process under the time limit; its result dict."""
  command = [
    sys.executable,
    __file__,
    f'--point={model}:{resolution}',
    f'--steps={args.steps}',
    f'--warmup={args.warmup}',
  ] + (['--quick'] if args.quick else [])
  if args.max_memory_gib is not None:
    command.append(f'--max_memory_gib={args.max_memory_gib}')
  base = {'model': model, 'resolution': resolution}
  try:
    child = subprocess.run(
      command,
      capture_output=True,
      text=True,
      timeout=args.point_time_limit_s,
      env={**os.environ, 'PYTHONPATH': str(common.ROOT)},
    )
  except subprocess.TimeoutExpired:
    return {**base, 'status': 'timeout', 'note': f'over --point_time_limit_s={args.point_time_limit_s}'}
  lines = [line for line in child.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
  if child.returncode or not lines:
    last_error = (child.stderr.strip().splitlines() or ['no output'])[-1]
    return {**base, 'status': 'error', 'note': f'exit {child.returncode}: {last_error}'[:300]}
  return json.loads(lines[-1][len(RESULT_PREFIX) :])


def predicted_seconds(previous: dict, resolution: int, args) -> float:
  """A lower bound on the next point's time: its compile plus every step, grown linearly in tokens."""
  growth = (resolution / previous['resolution']) ** 2
  return previous['compile_s'] + (args.warmup + args.steps) * previous['step_s_median'] * growth


def plot(plt, rows: list[dict], path: pathlib.Path, device: str):
  """Step time and memory against tokens (log-log), with ideal O(N log N), O(N^2) (and O(N)) lines."""
  figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
  ok = [row for row in rows if row['status'] == 'ok']
  for model, color in zip(MODELS, ('tab:blue', 'tab:orange', 'tab:green')):
    points = sorted((row for row in ok if row['model'] == model), key=lambda row: row['tokens'])
    if points:
      tokens = [row['tokens'] for row in points]
      time_axes.plot(tokens, [row['step_s_median'] for row in points], marker='o', color=color, label=model)
      memory_axes.plot(
        tokens, [row['memory_analysis_gib'] for row in points], marker='o', color=color, label=model
      )
    refused = [
      row
      for row in rows
      if row['model'] == model
      and row['status'] == 'over_memory'
      and row.get('memory_analysis_gib') is not None
    ]
    if refused:  # what XLA said the step would need: compiled, never run
      memory_axes.plot(
        [row['tokens'] for row in refused],
        [row['memory_analysis_gib'] for row in refused],
        'x',
        color=color,
        markersize=9,
        label=f'{model}: over the cap, not run',
      )
  all_tokens = sorted({row['tokens'] for row in ok})

  def ideal(axes, anchor_model, key, shape, label, style):
    # Anchored at the model's largest measured point, where the asymptotic term dominates.
    anchor = max(
      (row for row in ok if row['model'] == anchor_model), key=lambda row: row['tokens'], default=None
    )
    if anchor is None or len(all_tokens) < 2:
      return
    scale = anchor[key] / shape(anchor['tokens'])
    axes.plot(all_tokens, [scale * shape(n) for n in all_tokens], style, color='gray', label=label)

  ideal(time_axes, 'atlas', 'step_s_median', lambda n: n * math.log2(n), 'ideal O(N log N) (at Atlas)', '--')
  ideal(time_axes, 'vit', 'step_s_median', lambda n: n * n, 'ideal O(N²) (at ViT)', ':')
  ideal(memory_axes, 'atlas', 'memory_analysis_gib', lambda n: n, 'ideal O(N) (at Atlas)', '--')
  ideal(memory_axes, 'vit', 'memory_analysis_gib', lambda n: n * n, 'ideal O(N²) (at ViT)', ':')
  resolutions = {row['tokens']: row['resolution'] for row in rows if 'tokens' in row}
  for axes, ylabel in ((time_axes, 'train step (s, median)'), (memory_axes, 'XLA memory_analysis (GiB)')):
    axes.set(xscale='log', yscale='log', xlabel='tokens N (resolution px below)', ylabel=ylabel)
    axes.set_xticks(sorted(resolutions), [f'{n}\n{resolutions[n]}px' for n in sorted(resolutions)])
    axes.minorticks_off()
    axes.legend(fontsize=8)
  time_axes.set_title('training step time, batch 1')
  memory_axes.set_title('memory of the compiled train step')
  figure.suptitle(f'Figure 1a at CPU scale: T-width models, patch 8, on {device}')
  figure.tight_layout()
  figure.savefig(path, dpi=80)
  plt.close(figure)


def sweep(args) -> list[dict]:
  models = [model for model in args.models.split(',') if model]
  unknown = sorted(set(models) - set(MODELS))
  if unknown or not models:
    raise common.ExperimentError(f'unknown --models {unknown}; known: {",".join(MODELS)}')
  top = 128 if args.quick else args.max_resolution
  if top < 128:
    raise common.ExperimentError(f'--max_resolution must be at least 128, got {top}')
  resolutions = [128 * 2**k for k in range(int(math.log2(top // 128)) + 1)]
  output = pathlib.Path(args.output)
  output.mkdir(parents=True, exist_ok=True)
  rows, last_ok, stopped = [], {}, set()
  for resolution in resolutions:  # resolution-major, so every model gets its cheap points first
    for model in models:
      if model in stopped:
        continue
      previous = last_ok.get(model)
      if previous and predicted_seconds(previous, resolution, args) > args.point_time_limit_s:
        row = {
          'model': model,
          'resolution': resolution,
          'status': 'predicted_over_time',
          'note': f'at least {predicted_seconds(previous, resolution, args):.0f} s predicted',
        }
      else:
        start = time.monotonic()
        row = run_point(args, model, resolution)
        row['note'] = f'{row.get("note", "")}; point took {time.monotonic() - start:.0f} s'.lstrip('; ')
      rows.append(row)
      print(f'scaling: {json.dumps(row)}', flush=True)
      if row['status'] == 'ok':
        last_ok[model] = row
      else:
        stopped.add(model)
      common.write_csv(output / 'points.csv', rows, FIELDS)  # every point: a killed sweep keeps its rows
  if not any(row['status'] == 'ok' for row in rows):
    print('scaling: no point was measured, so no plot')
    return rows
  plt = common.pyplot()
  if plt is not None:
    device = next(row['device'] for row in rows if row['status'] == 'ok')
    plot(plt, rows, output / 'scaling.png', device)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default=','.join(MODELS), help='comma-separated subset of the models')
  parser.add_argument('--max_resolution', type=int, default=4096, help='largest side in px (128 x 2^k)')
  parser.add_argument(
    '--max_memory_gib',
    type=float,
    default=None,
    help="skip points whose compiled step needs more GiB (default: 8 on CPU, 90%% of the device's memory)",
  )
  parser.add_argument('--point_time_limit_s', type=float, default=300.0, help='wall-clock limit of one point')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per point')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after compilation')
  parser.add_argument(
    '--output', default=str(pathlib.Path(__file__).parent), help='where points.csv and the PNG go'
  )
  parser.add_argument('--quick', action='store_true', help='seconds-long smoke run (tiny model, 128 px)')
  parser.add_argument('--point', default=None, help=argparse.SUPPRESS)  # MODEL:RESOLUTION, in a child process
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    sys.exit('error: --steps must be >= 1 and --warmup >= 0')
  try:
    if args.point:
      args.model, resolution = args.point.split(':')
      args.resolution = int(resolution)
      print(RESULT_PREFIX + json.dumps(measure_point(args)), flush=True)
    else:
      sweep(args)
  except common.ExperimentError as error:
    sys.exit(f'error: {error}')


if __name__ == '__main__':
  main()
