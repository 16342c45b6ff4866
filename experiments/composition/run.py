"""Table 5 (composition of the stages) on the synthetic long-range task, quickstart geometry.

python experiments/composition/run.py [--steps=200] [--seeds=0,1,2] [--variants=A,B] [--output=DIR]
    [--bench_steps=50] [--quick]

Trains `configs/quickstart.py` (64 px, patch 4, windows 4 x 4, pool 4: two scales, depths (2, 2)) with two
compositions for the same steps, seeds and recipe, each through the real trainer:
  atlas  stage 1 runs 2 MSA blocks on both scales, then drops the finest; stage 2 runs 2 blocks on the
         coarse scale alone (the paper's D2D10 at this depth)
  stack  all 4 blocks on both scales, token average across scales for the readout
and writes under --output (default: this folder) results.csv, summary.csv, curves.csv and composition.png.
The paper's Table 5 reports runtime too: the training runs' step times follow the shared machine's load,
so step_time.csv also times each variant's train step back to back with `atlas_jax.benchmark` (the same
step, --bench_steps after 3 warmup steps) and counts its model FLOPs per image, which no load changes.
The paper's third row (2 x 2 convolutional downsampling per stage) has no switch here and is not run.
`--quick` runs the same code on a 32 px, 2-step, 1-seed miniature in seconds (a smoke test, not a result).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from experiments import common  # noqa: E402 (after the path is set)

VARIANTS = {
  'atlas': ('atlas', {'model.composition': 'atlas'}),
  'stack': ('atlas', {'model.composition': 'stack'}),
}
# Table 5 of the paper (HR-IN100, 512 px, 12 Small blocks, top-1 %, docs/model.md). Runtimes 38 and 75 min.
PAPER_TOP1 = {'atlas': 70.09, 'stack': 69.88}
PAPER_RUNTIME_MIN = {'atlas': 38, 'stack': 75}
DEFAULT_STEPS = 200


def time_steps(args, variants: list[str]) -> list[dict]:
  """Each variant's train step timed back to back by atlas_jax.benchmark, with its model FLOPs per image."""
  from atlas_jax import benchmark

  steps, warmup = (1, 0) if args.quick else (args.bench_steps, 3)  # --quick: that the timing runs at all
  rows = []
  for variant in variants:
    model, overrides = VARIANTS[variant]
    config = common.quickstart_config(model, 1, 0, overrides, args.quick)
    result = next(
      benchmark.benchmark(config, config.batch_size, ['train'], steps, warmup, check_fast_path=False)
    )
    rows.append(
      {
        'variant': variant,
        'batch_size': config.batch_size,
        'step_ms_median': result['step_ms_median'],
        'train_gflops_per_image': round(result['model_flops_per_image'] / 1e9, 4),
        'paper_runtime_min': PAPER_RUNTIME_MIN[variant],
      }
    )
    print(
      f'composition: {variant} train step {result["step_ms_median"]} ms (median of {steps}), '
      f'{rows[-1]["train_gflops_per_image"]} GFLOP per image',
      flush=True,
    )
  return rows


def main(argv=None):
  parser = common.accuracy_parser(__doc__, 'composition', VARIANTS, DEFAULT_STEPS, '0,1,2')
  parser.add_argument(
    '--bench_steps', type=int, default=50, help='timed train steps per variant (0: no timing)'
  )
  args = parser.parse_args(argv)
  try:
    summary = common.run_accuracy_experiment(
      args, 'composition', VARIANTS, PAPER_TOP1, 'Table 5, composition'
    )
  except common.ExperimentError as error:
    sys.exit(f'error: {error}')
  if args.bench_steps < 1:
    return
  timing = time_steps(args, [row['variant'] for row in summary])
  common.write_csv(
    pathlib.Path(args.output) / 'step_time.csv',
    timing,
    ['variant', 'batch_size', 'step_ms_median', 'train_gflops_per_image', 'paper_runtime_min'],
  )
  by_variant = {row['variant']: row for row in timing}
  if len(by_variant) == 2:
    ratio = by_variant['stack']['step_ms_median'] / by_variant['atlas']['step_ms_median']
    flops = by_variant['stack']['train_gflops_per_image'] / by_variant['atlas']['train_gflops_per_image']
    print(
      f'composition: stack / atlas: step time {ratio:.2f}x, FLOPs {flops:.2f}x '
      f'(paper runtime {PAPER_RUNTIME_MIN["stack"] / PAPER_RUNTIME_MIN["atlas"]:.2f}x)'
    )


if __name__ == '__main__':
  main()
