"""The quickstart against the same model on windows only: does the synthetic task need long range?

python experiments/quickstart_vs_windows/run.py [--steps=N] [--seeds=0,1] [--out=DIR]

Trains `configs/quickstart.py` (Atlas) and `configs/quickstart.py:model=window_vit` (the same stem, blocks
and readout, windows that never communicate) with the same steps, seeds and settings, each through the
real command line, and writes results.csv (final validation top-1, wall time per run) and a learning-curve
PNG when matplotlib is installed.
"""

import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ('atlas', 'window_vit')


def train(model: str, steps: int, seed: int, workdir: pathlib.Path) -> dict:
  command = [
    sys.executable,
    '-m',
    'atlas_jax.main',
    f'--config=configs/quickstart.py:model={model},steps={steps}',
    f'--config.seed={seed}',
    f'--workdir={workdir}',
  ]
  start = time.monotonic()
  subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, 'PYTHONPATH': str(ROOT)})
  wall_s = time.monotonic() - start
  from atlas_jax import metrics  # the runs are subprocesses; only reading needs the package

  records = metrics.read_metrics(workdir)  # sorted by step
  curve = [(r['step'], r['top1']) for r in records if r['kind'] == 'eval' and r['weights'] == 'raw']
  return {
    'model': model,
    'seed': seed,
    'steps': steps,
    'top1': curve[-1][1],
    'wall_s': round(wall_s, 1),
    'curve': curve,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=None, help="optimizer steps (default: the config's)")
  parser.add_argument('--seeds', default='0', help='comma-separated seeds')
  parser.add_argument('--out', default=str(ROOT / 'experiments' / 'quickstart_vs_windows'))
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.steps is None:
    sys.path.insert(0, str(ROOT))
    from configs import quickstart

    args.steps = quickstart.get_config().total_steps
  results = []
  for seed in (int(seed) for seed in args.seeds.split(',')):
    for model in MODELS:
      workdir = out / 'workdirs' / f'{model}_seed{seed}'
      if workdir.exists():
        raise SystemExit(f'{workdir} exists: remove it or pass another --out')
      results.append(train(model, args.steps, seed, workdir))
      print(json.dumps({key: value for key, value in results[-1].items() if key != 'curve'}), flush=True)
  with open(out / 'results.csv', 'w', newline='') as file:
    writer = csv.DictWriter(file, ['model', 'seed', 'steps', 'top1', 'wall_s'])
    writer.writeheader()
    writer.writerows({key: value for key, value in result.items() if key != 'curve'} for result in results)
  with open(out / 'curves.csv', 'w', newline='') as file:
    writer = csv.writer(file)
    writer.writerow(['model', 'seed', 'step', 'top1'])
    for result in results:
      writer.writerows((result['model'], result['seed'], step, top1) for step, top1 in result['curve'])
  try:
    import matplotlib

    matplotlib.use('Agg')
    from matplotlib import pyplot
  except ImportError:
    print('matplotlib is not installed: curves.csv only, no PNG')
    return
  figure, axes = pyplot.subplots(figsize=(6, 4))
  for result in results:
    steps, top1 = zip(*result['curve'])
    axes.plot(steps, top1, marker='o', label=f'{result["model"]} (seed {result["seed"]})')
  axes.axhline(0.25, color='gray', linestyle='--', label='chance')
  axes.set(
    xlabel='optimizer step',
    ylabel='validation top-1',
    ylim=(0, 1),
    title='Synthetic long-range task, 2 CPU cores',
  )
  axes.legend()
  figure.tight_layout()
  figure.savefig(out / 'curves.png', dpi=120)


if __name__ == '__main__':
  main()
