"""Shared pieces of the experiment commands: quickstart-geometry configs, one training run, CSVs and plots.

Every training run goes through the real trainer (`atlas_jax.train.run`, what `python -m atlas_jax.main`
calls) into its own workdir, and its numbers are read back from that workdir's `metrics.jsonl`. The runs of
one command share a process so that JAX is imported once; an interrupted command, started again with the
same arguments, resumes each unfinished run from its last checkpoint and reuses the finished ones.
"""

import argparse
import csv
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python experiments/NAME/run.py` from anywhere, without PYTHONPATH
  sys.path.insert(0, str(ROOT))

# `--quick`: the same task and code paths at the smallest geometry that still has two scales and two stages:
# 32 px, patch 4 (8 x 8 tokens), windows of 4 x 4 and a 2 x 2 pool (4 fine windows, one coarse window of
# 4 x 4 tokens), one block per stage, so `stack` still differs from `atlas`.
QUICK_OVERRIDES = {
  'image_size': (32, 32),
  'model.pool': 2,
  'model.dim': 16,
  'model.num_heads': 1,
  'model.depths': (1, 1),
  'batch_size': 4,
  'eval.batch_size': 4,
  'data.synthetic_val_size': 8,
  'data.workers': 1,
  'checkpoint.async_save': False,
  # No persistent compilation cache: its setting is process-wide and would outlive a quick run in a test.
  'compilation_cache_dir': '',
}
QUICK_STEPS = 2


def default_output(name: str) -> pathlib.Path:
  """Where experiment NAME writes unless told: outside the repository, never over its committed results."""
  return pathlib.Path(tempfile.gettempdir()) / 'atlas_jax_experiments' / name


class ExperimentError(Exception):
  """An experiment cannot run as asked (bad arguments, a workdir from another run)."""


def parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(seed) for seed in text.split(',') if seed.strip()]
  except ValueError:
    raise ExperimentError(f'--seeds takes comma-separated integers, e.g. 0,1; got {text!r}') from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ExperimentError(f'--seeds needs at least one seed and no repeats, got {text!r}')
  return seeds


def set_fields(config, overrides: dict) -> None:
  """Sets dotted `overrides` ({'model.communication': 'none'}) on `config`; unknown fields are refused."""
  config.lock()  # a locked ConfigDict refuses new fields
  try:
    config.update_from_flattened_dict(overrides)
  except (AttributeError, KeyError) as error:
    raise ExperimentError(f'config has no field named in {sorted(overrides)}: {error}') from None
  finally:
    config.unlock()


def quickstart_config(model: str, steps: int, seed: int, overrides: dict, quick: bool):
  """`configs/quickstart.py:model=MODEL,steps=STEPS` with `--config.seed=SEED` and `overrides` applied."""
  from configs import quickstart

  config = quickstart.get_config(f'model={model},steps={steps}')
  config.seed = seed
  set_fields(config, {**(QUICK_OVERRIDES if quick else {}), **overrides})
  return config


def configure_jax(config) -> None:
  """What `atlas_jax.main` does before training: the persistent compilation cache, quiet absl logging."""
  from absl import logging
  import jax

  logging.set_verbosity(logging.WARNING)
  if config.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache_dir))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  """metrics.jsonl's records sorted by step (atlas_jax.metrics.read_metrics), or [] before the first."""
  from atlas_jax import metrics

  path = workdir / 'metrics.jsonl'
  return metrics.read_metrics(workdir) if path.exists() else []


def check_workdir(config, workdir: pathlib.Path) -> None:
  """Refuses a workdir that holds another run (model, batch, seed, recipe fields or number of steps)."""
  from atlas_jax import config as config_lib
  from atlas_jax import train as train_lib
  from atlas_jax import workdir as workdir_lib

  if not workdir_lib.config_path(workdir).exists():
    return
  stored_steps = workdir_lib.read_config(workdir).total_steps
  if stored_steps != config.total_steps:
    raise ExperimentError(
      f'{workdir} holds a run of {stored_steps} steps, not {config.total_steps}: '
      'remove it or pass another --output'
    )
  try:
    train_lib.check_resumable(workdir, config_lib.resolve(config))
  except train_lib.ResumeError as error:
    raise ExperimentError(f'{error} (or pass another --output)') from None


def train(config, workdir: pathlib.Path) -> dict:
  """Trains `config` into `workdir`, resuming it if unfinished, reusing it if finished; the run's results.

  Returns {'top1': final raw-weights validation top-1, 'curve': [(step, top1), ...], 'step_time_s': median
  logged training step time, 'wall_s': the run's wall time}. The wall time of the call that finished the
  run is kept in WORKDIR/experiment.json, so a reused run reports it too.
  """
  from atlas_jax import train as train_lib

  configure_jax(config)
  check_workdir(config, workdir)
  finished = any(r['kind'] == 'eval' and r['step'] == config.total_steps for r in read_metrics(workdir))
  record = workdir / 'experiment.json'
  if not finished:
    start = time.monotonic()
    train_lib.run(config, workdir)
    record.write_text(json.dumps({'wall_s': round(time.monotonic() - start, 1)}))
  records = read_metrics(workdir)
  curve = [(r['step'], r['top1']) for r in records if r['kind'] == 'eval' and r['weights'] == 'raw']
  if not curve or curve[-1][0] != config.total_steps:  # SIGTERM: the trainer saved and returned early
    raise ExperimentError(
      f'{workdir} stopped before step {config.total_steps}: start the same command again to resume it'
    )
  step_times = [r['step_time_s'] for r in records if r['kind'] == 'train' and 'step_time_s' in r]
  return {
    'top1': curve[-1][1],
    'curve': curve,
    'wall_s': json.loads(record.read_text())['wall_s'] if record.exists() else None,
    'step_time_s': round(statistics.median(step_times), 4) if step_times else None,
  }


def write_csv(path: pathlib.Path, rows: list[dict], fields: list[str]) -> None:
  with open(path, 'w', newline='') as file:
    writer = csv.DictWriter(file, fields, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)


def write_curves(path: pathlib.Path, rows: list[dict]) -> None:
  """One line per (variant, seed, eval step) of the rows' learning curves."""
  with open(path, 'w', newline='') as file:
    writer = csv.writer(file)
    writer.writerow(['variant', 'seed', 'step', 'top1'])
    for row in rows:
      writer.writerows((row['variant'], row['seed'], step, top1) for step, top1 in row['curve'])


def summarize(rows: list[dict], variants: list[str]) -> list[dict]:
  """Mean and spread of the final top-1 per variant, in `variants` order."""
  summary = []
  for variant in variants:
    top1 = [row['top1'] for row in rows if row['variant'] == variant]
    summary.append(
      {
        'variant': variant,
        'seeds': len(top1),
        'top1_mean': round(statistics.fmean(top1), 4),
        'top1_min': min(top1),
        'top1_max': max(top1),
      }
    )
  return summary


def pyplot():
  """matplotlib's pyplot on the file-only Agg backend, or None (with a note) when matplotlib is missing."""
  try:
    import matplotlib

    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
  except ImportError:
    print('matplotlib is not installed (pip install -r requirements-dev.txt): CSVs only, no PNG')
    return None
  return plt


def plot_accuracy(plt, rows: list[dict], variants: list[str], paper: dict, title: str, path: pathlib.Path):
  """Our final top-1 per variant (bar = mean, dots = seeds), our mean learning curves, the paper's top-1."""
  figure, (bars_axes, curve_axes, paper_axes) = plt.subplots(1, 3, figsize=(13, 4))
  positions = range(len(variants))
  summary = summarize(rows, variants)
  bars_axes.bar(positions, [s['top1_mean'] for s in summary], color='tab:blue', alpha=0.6)
  for position, variant in zip(positions, variants):
    seeds_top1 = [row['top1'] for row in rows if row['variant'] == variant]
    bars_axes.plot([position] * len(seeds_top1), seeds_top1, 'ko', markersize=4)
  bars_axes.axhline(0.25, color='gray', linestyle='--', label='chance')
  bars_axes.set_xticks(list(positions), variants, rotation=30, ha='right')
  bars_axes.set(ylabel='validation top-1', ylim=(0, 1), title='ours: final top-1 (dots = seeds)')
  bars_axes.legend(loc='upper left')
  for variant in variants:
    curves = [row['curve'] for row in rows if row['variant'] == variant]
    steps = [step for step, _ in curves[0]]
    mean = [statistics.fmean(curve[index][1] for curve in curves) for index in range(len(steps))]
    curve_axes.plot(steps, mean, marker='o', label=variant)
  curve_axes.axhline(0.25, color='gray', linestyle='--')
  curve_axes.set(
    xlabel='optimizer step',
    ylabel='validation top-1 (mean over seeds)',
    ylim=(0, 1),
    title='ours: learning curves',
  )
  curve_axes.legend(fontsize=8)
  paper_axes.bar(positions, [paper[variant] for variant in variants], color='tab:orange', alpha=0.6)
  paper_axes.set_xticks(list(positions), variants, rotation=30, ha='right')
  paper_axes.set(ylabel='top-1 (%)', ylim=(0, 100), title='paper (HR-IN100)')
  figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(path, dpi=80)
  plt.close(figure)


# ---------------------------------------------------------------------------------------------------------
# One accuracy experiment: variants of the quickstart trained for the same steps and seeds.


def accuracy_parser(doc: str, name: str, variants: dict, default_steps: int, default_seeds: str):
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument('--steps', type=int, default=default_steps, help='optimizer steps of every run')
  parser.add_argument('--seeds', default=default_seeds, help='comma-separated seeds')
  parser.add_argument('--variants', default=','.join(variants), help='comma-separated subset of the variants')
  parser.add_argument(
    '--output',
    default=str(default_output(name)),
    help='where the CSVs, the PNG and the workdirs go (default outside the repository; the committed '
    'results under experiments/NAME/ are only written when this names that folder)',
  )
  parser.add_argument(
    '--quick', action='store_true', help='seconds-long smoke run (tiny model, 2 steps, 1 seed)'
  )
  return parser


def run_accuracy_experiment(args, name: str, variants: dict, paper: dict, title: str) -> list[dict]:
  """Trains each (seed, variant) of `variants` ({variant: (model.name, overrides)}) and writes the outputs.

  Writes under args.output: results.csv (a row per run), summary.csv (per variant: mean, min and max final
  top-1 over seeds, median step time, the paper's number), curves.csv and NAME.png. Returns the summary rows.
  """
  seeds = [0] if args.quick else parse_seeds(args.seeds)
  steps = QUICK_STEPS if args.quick else args.steps
  chosen = [variant for variant in args.variants.split(',') if variant]
  unknown = sorted(set(chosen) - set(variants))
  if unknown or not chosen:
    raise ExperimentError(f'unknown --variants {unknown}; known: {",".join(variants)}')
  if steps < 1:
    raise ExperimentError(f'--steps must be >= 1, got {steps}')
  output = pathlib.Path(args.output)
  output.mkdir(parents=True, exist_ok=True)
  rows = []
  for seed in seeds:
    for variant in chosen:
      model, overrides = variants[variant]
      config = quickstart_config(model, steps, seed, overrides, args.quick)
      result = train(config, output / 'workdirs' / f'{variant}_seed{seed}')
      rows.append({'variant': variant, 'seed': seed, 'steps': steps, **result})
      print(
        f'{name}: {variant} seed {seed}: top-1 {result["top1"]:.3f}, '
        f'median step {result["step_time_s"]} s, wall {result["wall_s"]} s',
        flush=True,
      )
  write_csv(output / 'results.csv', rows, ['variant', 'seed', 'steps', 'top1', 'step_time_s', 'wall_s'])
  write_curves(output / 'curves.csv', rows)
  summary = []
  for row in summarize(rows, chosen):
    step_times = [r['step_time_s'] for r in rows if r['variant'] == row['variant'] and r['step_time_s']]
    summary.append(
      {
        **row,
        'step_time_s': round(statistics.median(step_times), 4) if step_times else None,
        'paper_top1': paper[row['variant']],
      }
    )
  write_csv(
    output / 'summary.csv',
    summary,
    ['variant', 'seeds', 'top1_mean', 'top1_min', 'top1_max', 'step_time_s', 'paper_top1'],
  )
  for row in summary:
    print(
      f'{name}: {row["variant"]:>10}  ours {100 * row["top1_mean"]:5.1f}% (seeds {row["seeds"]}, '
      f'{100 * row["top1_min"]:.1f}-{100 * row["top1_max"]:.1f}), step {row["step_time_s"]} s  '
      f'paper {row["paper_top1"]:.2f}%',
      flush=True,
    )
  plt = pyplot()
  if plt is not None:
    plot_accuracy(
      plt,
      rows,
      chosen,
      paper,
      f'{title}: synthetic task, {steps} steps, seeds {seeds}',
      output / f'{name}.png',
    )
  return summary
