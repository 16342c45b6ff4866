r"""Converts a checkpoint of the reference PyTorch Atlas into an atlas_jax workdir (torch not needed).

python -m atlas_jax.tools.convert_torch --checkpoint=PATH --config=atlas_b_1024 --output=WORKDIR \
    [--labels=FILE] [--config.FIELD=VALUE ...]

PATH is the reference trainer's file (its `model` entry is used) or a bare state dict. Every parameter and
BatchNorm statistic is mapped by name and nothing is written unless every one fits. A checkpoint of another
model than the config's is reported in a few lines: what the checkpoint holds (dim, depths per stage,
classes, stem, scales) against what the config builds, and the `--config.model.*=` overrides that match it;
one of the same model with tensors missing, unexpected or mis-shaped names the first of them. The workdir's
config says `parent_window: raster` (what the reference computes) unless `--config.model.parent_window` is
given. `--config` takes a config file or a shipped config's name (README: the config of each test
checkpoint in tests/fixtures/).

The workdir's labels.txt (the class names predict and the Python API show, one a line in index order) comes
from `--labels=FILE` (one name a line, in index order, as many as the model's classes), else from the
config's class list `data.classes` when it has one (sorted, as the data sources number them); without
either the workdir has none and predictions name the classes as the config's dataset does.

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
from atlas_jax.data import sources
from atlas_jax.errors import AtlasError, one_line_errors
from atlas_jax.models import VARIANTS, build_model, reference_names
from atlas_jax.models import layout as layout_lib
from atlas_jax.models.reference_names import ReferenceMismatchError, variables_from_reference
from atlas_jax.tools.torch_checkpoint import CheckpointTooLargeError, load_state_dict

# The default cap on what reading a checkpoint may take: this many times the float32 bytes of the model's
# variables (weights, AdamW's two moments, room to spare), plus a constant for everything else in the file.
CAP_VARIABLE_FACTOR = 4
CAP_CONSTANT_BYTES = 16 << 20


def define_flags():
  """The command line's flags; defined only when run as a program, so the module imports anywhere."""
  global _CONFIG, _CHECKPOINT, _OUTPUT, _MAX_BYTES, _LABELS
  _CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file of the model the checkpoint holds.', lock_config=True
  )
  _CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'The PyTorch checkpoint (zip format).')
  _OUTPUT = flags.DEFINE_string('output', None, 'The workdir to write (must not hold checkpoints yet).')
  _LABELS = flags.DEFINE_string(
    'labels',
    None,
    "The class names, one a line in index order, for the workdir's labels.txt; default: the config's "
    'data.classes when it has one.',
  )
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


def read_labels_file(path, num_classes: int) -> list[str]:
  """`--labels=FILE`: one class name a line in index order (blank lines skipped), as many as the classes."""
  try:
    text = pathlib.Path(path).read_text(encoding='utf-8')
  except (OSError, UnicodeDecodeError) as error:
    raise ConversionError(
      f'cannot read --labels={path}: {getattr(error, "strerror", None) or error}'
    ) from None
  names = [line.strip() for line in text.splitlines() if line.strip()]
  if len(names) != num_classes:
    raise ConversionError(
      f'--labels={path} lists {len(names)} class names but the model has {num_classes} classes '
      '(model.num_classes): one name a line, in index order'
    )
  return names


def config_labels(config) -> list[str] | None:
  """The class names of the config's class list `data.classes` (sorted, as the sources number them), or None
  when it has none."""
  if not config.data.classes:
    return None
  try:
    names = sources.read_class_list(config.data.classes)
  except sources.DataSourceError as error:
    raise ConversionError(f'{error}; or pass the names with --labels=FILE') from None
  if len(names) != config.model.num_classes:
    raise ConversionError(
      f'data.classes={config.data.classes} lists {len(names)} classes but the model has '
      f'{config.model.num_classes} (model.num_classes)'
    )
  return names


def _scales(config, image_size) -> int | None:
  model = config.model
  try:
    return len(layout_lib.check_image_size(image_size, model.patch_size, model.window, model.pool))
  except layout_lib.LayoutError:
    return None


def _image_size_for(config, scales: int) -> int | None:
  """A square image size, nearest the config's, at which the config's model has `scales` scales."""
  side = max(config.image_size)
  for step in sorted(range(-4, 5), key=abs):
    size = int(side * config.model.pool**step) if step >= 0 else side // config.model.pool**-step
    if size >= config.model.patch_size and _scales(config, (size, size)) == scales:
      return size
  return None


def _heads_for(dim: int, config) -> int:
  """A head count for `dim`: the variant's of that width, the config's where it divides `dim`, else heads of
  64 channels (or the fewest that divide `dim`). The weights do not hold it."""
  for variant_dim, heads, _ in VARIANTS.values():
    if variant_dim == dim:
      return heads
  if dim % config.model.num_heads == 0:
    return config.model.num_heads
  if dim % 64 == 0:
    return dim // 64
  return next(heads for heads in range(2, dim + 1) if dim % heads == 0)


def mismatch_report(state_dict, abstract, config, config_name: str | None = None) -> str | None:
  """When `state_dict` holds another model than `config`'s: what the checkpoint is, what the config is and
  the overrides that match, in four lines; None when both describe the same model (a tensor missing, renamed
  or mis-shaped: `variables_from_reference` names them)."""
  held = reference_names.describe_reference({name: np.shape(value) for name, value in state_dict.items()})
  built = reference_names.describe_reference(reference_names.reference_shapes(abstract))
  built['scales'] = _scales(config, config.image_size)
  if held == built:
    return None
  overrides = []
  if held['stem'] != built['stem'] or held['patch_size'] != built['patch_size']:
    overrides.append(f'--config.model.patch_size={held["patch_size"]}')
  if held['dim'] != built['dim'] and held['dim']:
    overrides.append(f'--config.model.dim={held["dim"]}')
    overrides.append(f'--config.model.num_heads={_heads_for(held["dim"], config)}')
  image_size = None
  if held['scales'] and held['scales'] != built['scales']:
    image_size = _image_size_for(config, held['scales'])
    if image_size:
      overrides.append(f'--config.image_size={image_size}')
  if held['depths'] and (held['depths'] != built['depths'] or image_size):  # default depths follow the scales
    depths = ','.join(map(str, held['depths'])) + ',' * (len(held['depths']) == 1)
    overrides.append(f"--config.model.depths='({depths})'")  # quoted for the shell
  for field in ('num_classes', 'mlp_ratio', 'stem_in_dim', 'stem_width'):
    if held[field] and held[field] != built[field]:
      overrides.append(f'--config.model.{field}={held[field]}')
  named = f' ({config_name})' if config_name else ''
  heads = " (num_heads is in no tensor: give the reference model's)" if held['dim'] != built['dim'] else ''
  return '\n'.join(
    [
      f'the checkpoint holds another model than the config{named}:',
      f'  checkpoint: {reference_names.describe(held)}',
      f'  config:     {reference_names.describe(built)}',
      f'  to convert it: {" ".join(overrides) or "(no override found: check the checkpoint)"}{heads}',
    ]
  )


def convert(
  checkpoint,
  config,
  output,
  parent_window_given: bool = False,
  max_bytes: int | None = None,
  labels: str | None = None,
  config_name: str | None = None,
) -> dict:
  """Converts `checkpoint` for the model of `config` into workdir `output`; returns what was written.

  `max_bytes` caps what reading the checkpoint may take (see `load_torch_checkpoint`); None means
  `default_max_bytes` of the model. `labels`: a file of class names (one a line, index order) for the
  workdir's labels.txt; default the config's `data.classes` when it has one. `config_name` names the config
  in a mismatch report.
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
  names = read_labels_file(labels, config.model.num_classes) if labels is not None else config_labels(config)
  abstract = run_setup.abstract_variables(build_model(config), config.image_size)
  cap = default_max_bytes(abstract) if max_bytes is None else max_bytes
  try:
    state_dict = load_state_dict(checkpoint, max_bytes=cap)
  except CheckpointTooLargeError as error:
    how = 'the cap given' if max_bytes is not None else 'the default cap for this model'
    raise CheckpointTooLargeError(f'{error}; {how} is {cap:,} bytes, raise it with --max_bytes=N') from None
  try:
    variables = variables_from_reference(state_dict, abstract)  # raises, naming tensors, before any write
  except ReferenceMismatchError:
    report = mismatch_report(state_dict, abstract, config, config_name)
    if report is None:
      raise
    raise ReferenceMismatchError(report) from None
  config_path = workdir_lib.write_config(output, config)
  labels_path = workdir_lib.write_labels(output, names) if names is not None else None
  checkpoints = checkpointing.Checkpoints(output)
  checkpoints.save(0, {'params': variables['params'], 'batch_stats': variables.get('batch_stats')})
  checkpoints.close()
  counts = {name: sum(leaf.size for leaf in jax.tree.leaves(tree)) for name, tree in variables.items()}
  return {
    'config': config_path,
    'checkpoint': workdir_lib.checkpoints_dir(output) / '0',
    'counts': counts,
    'parent_window': config.model.parent_window,
    'labels': labels_path,
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
  config_name = next((arg.split('=', 1)[1] for arg in sys.argv if arg.startswith('--config=')), None)
  written = convert(
    _CHECKPOINT.value,
    _CONFIG.value,
    _OUTPUT.value,
    parent_window_given,
    _MAX_BYTES.value,
    _LABELS.value,
    config_name,
  )
  counts = ', '.join(f'{count:,} {name}' for name, count in written['counts'].items())
  print(f'wrote {written["config"]} (parent_window: {written["parent_window"]})')
  print(f'wrote {written["checkpoint"]}: {counts}')
  if written['labels'] is not None:
    print(f'wrote {written["labels"]}: {_CONFIG.value.model.num_classes} class names')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)  # command-line mistakes: one line
