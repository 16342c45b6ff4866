"""CPU compile time of the training step, this checkout against another, side by side in one run.

python experiments/compile_time/run.py --other=/path/to/another/checkout [--output=experiments/compile_time]

Each row runs `python -m atlas_jax.main --config=CONFIG --config.mode=compile` in a fresh process of its
checkout with the flags below (batch 8, no accumulation, remat per block, persistent compilation cache off)
and reads `compile_s` from the JSON line it prints: tracing, lowering and XLA's compile of exactly the step
training jits. The rows alternate between the checkouts so that a slow spell of the machine hits both.
`results.json` in `--output` holds every measurement and the ratio of the medians per config.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parents[1]
CONFIGS = ('configs/atlas_b_4096.py', 'configs/atlas_b_1024.py')
FLAGS = (
  '--config.batch_size=8',
  '--config.grad_accum_steps=1',
  '--config.model.remat=block',
  '--config.compilation_cache_dir=',
)


def compile_seconds(checkout: pathlib.Path, config: str) -> float:
  """`compile_s` of one fresh `mode=compile` process of `checkout` (its exit code says only fits or not)."""
  command = [sys.executable, '-m', 'atlas_jax.main', f'--config={config}', '--config.mode=compile', *FLAGS]
  # Older checkouts require --workdir even to compile; mode=compile writes nothing there.
  command.append(f'--workdir={checkout / ".compile_time_workdir"}')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(checkout)}
  result = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=1800)
  lines = [line for line in result.stdout.splitlines() if line.startswith('{')]
  if not lines:
    raise RuntimeError(f'{checkout} {config} printed no JSON line:\n{result.stderr[-2000:]}')
  return float(json.loads(lines[-1])['compile_s'])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--other', required=True, type=pathlib.Path, help='the checkout to compare against')
  parser.add_argument('--output', default=HERE, type=pathlib.Path)
  parser.add_argument('--repeats', default=2, type=int)
  parser.add_argument('--configs', default=','.join(CONFIGS))
  args = parser.parse_args()
  checkouts = {'this': ROOT, 'other': args.other.resolve()}
  rows = []
  for config in args.configs.split(','):
    for repeat in range(args.repeats):
      for name, checkout in checkouts.items():
        seconds = compile_seconds(checkout, config)
        rows.append({'config': config, 'checkout': name, 'repeat': repeat, 'compile_s': seconds})
        print(json.dumps(rows[-1]), flush=True)
  summary = {}
  for config in args.configs.split(','):
    medians = {
      name: statistics.median(r['compile_s'] for r in rows if r['config'] == config and r['checkout'] == name)
      for name in checkouts
    }
    summary[config] = {**medians, 'other_over_this': round(medians['other'] / medians['this'], 2)}
  results = {
    'command_flags': list(FLAGS),
    'checkouts': {name: str(path) for name, path in checkouts.items()},
    'commits': {name: _commit(path) for name, path in checkouts.items()},
    'cpu_count': os.cpu_count(),
    'rows': rows,
    'summary': summary,
  }
  args.output.mkdir(parents=True, exist_ok=True)
  (args.output / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
  print(json.dumps(summary, indent=2))


def _commit(path: pathlib.Path) -> str:
  result = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=path, capture_output=True, text=True)
  return result.stdout.strip()


if __name__ == '__main__':
  main()
