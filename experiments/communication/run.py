"""Table 4 (communication between scales) on the synthetic long-range task, quickstart geometry.

python experiments/communication/run.py [--steps=300] [--seeds=0,1,2] [--variants=A,B] [--output=DIR]
    [--quick]

Trains five variants of `configs/quickstart.py` (64 px, patch 4, windows 4 x 4, pool 4: two scales) for the
same steps, seeds and recipe, each through the real trainer, and writes under --output (default outside
the repository: experiments/common.py's default_output): results.csv (final validation top-1, median step time and wall time per run), summary.csv (per
variant: mean, min, max over seeds, beside the paper's number), curves.csv and communication.png.
The variants, as the paper's rows:
  window_vit  single scale, windows that never communicate (WindowViT)
  none        both scales, window attention at each, no cross-scale attention (pooled summaries only)
  bottom_up   + the coarse tokens attend to the fine window below them
  top_down    + the fine tokens attend to the covering coarse window
  full        both: the MSA block (Atlas)
`--quick` runs the same code on a 32 px, 2-step, 1-seed miniature in seconds (a smoke test, not a result).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from experiments import common  # noqa: E402 (after the path is set)

# variant -> (model.name, config overrides)
VARIANTS = {
  'window_vit': ('window_vit', {}),
  'none': ('atlas', {'model.communication': 'none'}),
  'bottom_up': ('atlas', {'model.communication': 'bottom_up'}),
  'top_down': ('atlas', {'model.communication': 'top_down'}),
  'full': ('atlas', {'model.communication': 'full'}),
}
# Table 4 of the paper (HR-IN100, 256 px, top-1 %): docs/model.md.
PAPER_TOP1 = {'window_vit': 59.39, 'none': 65.14, 'bottom_up': 69.92, 'top_down': 69.04, 'full': 72.02}
# 300 steps (the quickstart's 500 shortened) x 5 variants x 3 seeds: about 15 minutes on 2 shared cores
# (docs/experiments.md).
DEFAULT_STEPS = 300


def main(argv=None):
  args = common.accuracy_parser(__doc__, 'communication', VARIANTS, DEFAULT_STEPS, '0,1,2').parse_args(argv)
  try:
    common.run_accuracy_experiment(args, 'communication', VARIANTS, PAPER_TOP1, 'Table 4, communication')
  except common.ExperimentError as error:
    sys.exit(f'error: {error}')


if __name__ == '__main__':
  main()
