"""Two checkouts train the same runs to the same numbers: every logged field but the timings equal.

python experiments/equivalence/run.py --other=/path/to/another/checkout [--output=experiments/equivalence]

A refactoring that means to change no behaviour is checked with it: both checkouts (this one and `--other`,
e.g. `git worktree add /tmp/before COMMIT`) run through their own command line, in their own process,
  1. the quickstart for 50 steps with `log.every_steps=1` (the synthetic task, evaluated at the end), and
  2. 10 steps on a small image folder written here (three classes, images of several sizes) with Mixup/CutMix,
     random erasing on every image and the accelerator-side upsampling (host_max_side below image_size),
and their metrics.jsonl are compared record by record. `results.json` in `--output` lists each run's
records compared and every field that differs (none, when the checkouts agree).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parents[1]
TIMINGS = ('images_per_s', 'step_time_s')
RUNS = {
  'quickstart_50_steps': ['--config=configs/quickstart.py:steps=50', '--config.log.every_steps=1'],
  'folder_10_steps': [
    '--config=configs/quickstart.py:steps=10',
    '--config.data.source=folder',
    '--config.model.num_classes=3',
    '--config.batch_size=8',
    '--config.eval.batch_size=4',
    '--config.data.workers=0',
    '--config.log.every_steps=1',
    '--config.eval.every_steps=5',
    '--config.mixup.mixup_alpha=0.8',
    '--config.mixup.cutmix_alpha=1.0',
    '--config.mixup.label_smoothing=0.1',
    '--config.data.augment.erase_prob=1.0',
    '--config.data.augment.host_max_side=32',
  ],
}


def write_folder(directory: pathlib.Path) -> None:
  """train/ and val/ of three classes, photo-like JPEGs and PNGs of several sizes, the same every time."""
  rng = np.random.default_rng(0)
  for split, count in (('train', 8), ('val', 4)):
    for label in ('ant', 'bee', 'cat'):
      folder = directory / split / label
      folder.mkdir(parents=True)
      for index in range(count):
        height, width = (int(side) for side in rng.integers(40, 120, size=2))
        coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        image.save(folder / f'{index}.{"png" if index % 2 else "jpg"}')


def train(checkout: pathlib.Path, flags: list[str], workdir: pathlib.Path) -> list[dict]:
  env = {**os.environ, 'PYTHONPATH': str(checkout), 'JAX_PLATFORMS': 'cpu'}
  command = [
    sys.executable,
    '-m',
    'atlas_jax.main',
    f'--workdir={workdir}',
    *flags,  # --config=... first: its overrides follow it
    '--config.compilation_cache_dir=',
  ]
  result = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=1800)
  if result.returncode:
    raise SystemExit(f'{checkout}: {" ".join(flags)} failed:\n{result.stderr[-3000:]}')
  from atlas_jax import metrics  # the runs are subprocesses; only reading needs the package

  return metrics.read_metrics(workdir)  # sorted by step


def differences(ours: list[dict], theirs: list[dict]) -> list[str]:
  """Every (record, field) whose values differ, timings left out."""
  found = [] if len(ours) == len(theirs) else [f'{len(ours)} records here, {len(theirs)} there']
  for number, (mine, other) in enumerate(zip(ours, theirs)):
    for field in sorted((set(mine) | set(other)) - set(TIMINGS)):
      if mine.get(field) != other.get(field):
        found.append(
          f'record {number} (step {mine.get("step")}) {field}: {mine.get(field)!r} != {other.get(field)!r}'
        )
  return found


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--other', required=True, help='another checkout of atlas_jax (e.g. a git worktree)')
  parser.add_argument('--output', default=str(HERE), help='where results.json goes')
  args = parser.parse_args()
  other = pathlib.Path(args.other).resolve()
  results = {'this': str(ROOT), 'other': str(other), 'runs': {}}
  with tempfile.TemporaryDirectory(prefix='atlas_equivalence_') as scratch:
    scratch = pathlib.Path(scratch)
    write_folder(scratch / 'images')
    for name, flags in RUNS.items():
      if name.startswith('folder'):
        flags = [*flags, f'--config.data.data_dir={scratch / "images"}']
      records = {
        side: train(checkout, flags, scratch / side / name)
        for side, checkout in (('this', ROOT), ('other', other))
      }
      found = differences(records['this'], records['other'])
      results['runs'][name] = {
        'records': len(records['this']),
        'fields': sorted(set().union(*records['this'])),
        'differences': found,
      }
      print(f'{name}: {len(records["this"])} records, {len(found)} differences', flush=True)
  output = pathlib.Path(args.output)
  output.mkdir(parents=True, exist_ok=True)
  (output / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
  if any(run['differences'] for run in results['runs'].values()):
    raise SystemExit(f'the checkouts differ: see {output / "results.json"}')


if __name__ == '__main__':
  main()
