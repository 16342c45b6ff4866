"""The quickstart against the same model on windows only: does the synthetic task need long range?

python experiments/quickstart_vs_windows/run.py [--steps=N] [--seeds=0,1,2] [--output=DIR] [--quick]

Trains `configs/quickstart.py` (Atlas) and `configs/quickstart.py:model=window_vit` (the same stem, blocks
and readout, windows that never communicate) for the same steps (default: the quickstart's), seeds and
recipe, each through the real trainer, and writes under --output (default outside the repository:
experiments/common.py's default_output): results.csv (final validation top-1, median step time and wall
time per run), summary.csv (per model: mean, min, max over seeds), curves.csv and quickstart_vs_windows.png.
The `atlas` and `window_vit` runs are the `full` and `window_vit` runs of experiments/communication at the
same steps and seeds: copied into WORKDIRS they are read back, not trained again.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from configs import quickstart  # noqa: E402 (after the path is set)
from experiments import common  # noqa: E402

VARIANTS = {'window_vit': ('window_vit', {}), 'atlas': ('atlas', {})}
# Table 4 of the paper (HR-IN100, 256 px, top-1 %): WindowViT and MSA (docs/model.md).
PAPER_TOP1 = {'window_vit': 59.39, 'atlas': 72.02}


def main(argv=None):
  parser = common.accuracy_parser(
    __doc__, 'quickstart_vs_windows', VARIANTS, quickstart.get_config().total_steps, '0,1,2'
  )
  args = parser.parse_args(argv)
  try:
    common.run_accuracy_experiment(
      args, 'quickstart_vs_windows', VARIANTS, PAPER_TOP1, 'Quickstart vs windows'
    )
  except common.ExperimentError as error:
    sys.exit(f'error: {error}')


if __name__ == '__main__':
  main()
