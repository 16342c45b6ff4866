r"""Converts a checkpoint of the reference PyTorch Atlas into an atlas_jax workdir (torch not needed).

python -m atlas_jax.tools.convert_torch --checkpoint=PATH --config=configs/atlas_b_1024.py --output=WORKDIR \
    [--config.FIELD=VALUE ...]

PATH is the reference trainer's file (its `model` entry is used) or a bare state dict. Every parameter and
BatchNorm statistic is mapped by name; a missing, unexpected or mis-shaped tensor is reported by name and
nothing is written. The workdir's config says `parent_window: raster` (what the reference computes) unless
`--config.model.parent_window` is given.

Reading is capped before anything large is allocated: the archive may decompress to, and its tensors may
take, at most 4 x the float32 bytes of the model's variables plus 16 MiB each (enough for the weights and
AdamW's two moments); `--max_bytes=N` sets another cap. Encrypted records, overlapping or out-of-bounds
tensor views and declared sizes over the cap are refused with one `error:` line.
"""

import pathlib
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags
import numpy as np

from atlas_jax import checkpointing, run_setup
from atlas_jax import config as config_lib
from atlas_jax import workdir as workdir_lib
from atlas_jax.errors import AtlasError, one_line_errors
from atlas_jax.models import build_model
from atlas_jax.models.reference_names import variables_from_reference
from atlas_jax.tools.torch_checkpoint import CheckpointTooLargeError, load_state_dict

# The default cap on what reading a checkpoint may take: this many times the float32 bytes of the model's
# variables (weights, AdamW's two moments, room to spare), plus a constant for everything else in the file.
CAP_VARIABLE_FACTOR = 4
CAP_CONSTANT_BYTES = 16 << 20


def define_flags():
  """The command line's flags; defined only when run as a program, so the module imports anywhere."""
  global _CONFIG, _CHECKPOINT, _OUTPUT, _MAX_BYTES
  _CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file of the model the checkpoint holds.', lock_config=True
  )
  _CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'The PyTorch checkpoint (zip format).')
  _OUTPUT = flags.DEFINE_string('output', None, 'The workdir to write (must not hold checkpoints yet).')
  _MAX_BYTES = flags.DEFINE_integer(
    'max_bytes',
    None,
    'Cap, in bytes, on what the checkpoint may decompress to and on the tensors built from it; default '
    f'{CAP_VARIABLE_FACTOR} x the float32 bytes of the model plus {CAP_CONSTANT_BYTES >> 20} MiB.',
    lower_bound=1,
  )


class ConversionError(AtlasError, ValueError):
  """A checkpoint that cannot be converted, or an output that would overwrite one."""


def default_max_bytes(abstract) -> int:
  """The default cap for reading a checkpoint of the model whose variables are `abstract`."""
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))
  return CAP_VARIABLE_FACTOR * 4 * count + CAP_CONSTANT_BYTES


def convert(
  checkpoint, config, output, parent_window_given: bool = False, max_bytes: int | None = None
) -> dict:
  """Converts `checkpoint` for the model of `config` into workdir `output`; returns what was written.

  `max_bytes` caps what reading the checkpoint may take (see `load_torch_checkpoint`); None means
  `default_max_bytes` of the model.
  """
  output = pathlib.Path(output)
  if output.exists() and not output.is_dir():
    raise ConversionError(f'--output={output} is a file; point it at a new or empty workdir')
  if workdir_lib.checkpoints_dir(output).exists() and any(workdir_lib.checkpoints_dir(output).iterdir()):
    raise ConversionError(f'{output} already holds checkpoints; convert into a new, empty workdir')
  if not pathlib.Path(checkpoint).is_file():
    raise ConversionError(f'--checkpoint={checkpoint} is not a file: point it at a PyTorch checkpoint (.pth)')
  config = config_lib.resolve(config)
  if not parent_window_given:
    config.model.parent_window = 'raster'  # the reference computes top-down parents this way
  if config.model.name != 'atlas' or config.model.patch_size != 16 or config.model.composition != 'atlas':
    raise ConversionError(
      'reference checkpoints hold Atlas with the conv stem: model.name=atlas, '
      'model.patch_size=16, model.composition=atlas'
    )
  abstract = run_setup.abstract_variables(build_model(config), config.image_size)
  cap = default_max_bytes(abstract) if max_bytes is None else max_bytes
  try:
    state_dict = load_state_dict(checkpoint, max_bytes=cap)
  except CheckpointTooLargeError as error:
    how = 'the cap given' if max_bytes is not None else 'the default cap for this model'
    raise CheckpointTooLargeError(f'{error}; {how} is {cap:,} bytes, raise it with --max_bytes=N') from None
  variables = variables_from_reference(state_dict, abstract)  # raises, naming tensors, before any write
  config_path = workdir_lib.write_config(output, config)
  checkpoints = checkpointing.Checkpoints(output)
  checkpoints.save(0, {'params': variables['params'], 'batch_stats': variables.get('batch_stats')})
  checkpoints.close()
  counts = {name: sum(leaf.size for leaf in jax.tree.leaves(tree)) for name, tree in variables.items()}
  return {
    'config': config_path,
    'checkpoint': workdir_lib.checkpoints_dir(output) / '0',
    'counts': counts,
    'parent_window': config.model.parent_window,
  }


@one_line_errors
def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  for name, flag in (('--checkpoint', _CHECKPOINT), ('--output', _OUTPUT), ('--config', _CONFIG)):
    if flag.value is None:
      raise app.UsageError(f'{name} is required')
  parent_window_given = any(arg.startswith('--config.model.parent_window') for arg in sys.argv)
  written = convert(_CHECKPOINT.value, _CONFIG.value, _OUTPUT.value, parent_window_given, _MAX_BYTES.value)
  counts = ', '.join(f'{count:,} {name}' for name, count in written['counts'].items())
  print(f'wrote {written["config"]} (parent_window: {written["parent_window"]})')
  print(f'wrote {written["checkpoint"]}: {counts}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)  # command-line mistakes: one line
