"""The reference PyTorch implementation's parameter names, mapped to and from this package's tree.

One rule per module kind turns a Flax path of one block (the version-1 tree, `param_tree`) into the
reference's state-dict name; the importer and the parity tests both go through `variables_from_reference`,
which maps per block and stacks the blocks of each stage as the scanned model holds them. Layouts: a Linear weight is (out, in) where a
Flax Dense kernel is (in, out); a Conv2d weight is (out, in, kh, kw) where a Flax kernel is (kh, kw, in, out).
"""

import re
from typing import Mapping

import flax
import numpy as np

from atlas_jax.errors import AtlasError
from atlas_jax.models import param_tree

# Reference buffers and modules the Atlas forward never reads: skipped by rule, never silently.
UNUSED_REFERENCE_KEYS = (
  re.compile(r'.*\.num_batches_tracked$'),  # BatchNorm step counters
  re.compile(r'^atlas_models\.\d+\.norm\.'),  # per-stage BatchNorm readout heads (process_readout=False)
  re.compile(r'^atlas_models\.\d+\.head\.'),
)

_STEM_MODULES = {
  'conv1': 'conv0.0',
  'bn1': 'conv0.1',
  'conv2': 'conv0.3',
  'bn2': 'conv0.4',
  'down1': 'ds1',
  'down2': 'ds2',
}
_RESIDUAL_MODULES = {
  'conv1': 'conv_block1.0',
  'bn1': 'conv_block1.1',
  'conv2': 'conv_block2.0',
  'bn2': 'conv_block2.1',
}
_SCALE_MODULES = {
  'norm_q': 'norm1_q',
  'norm_kv': 'norm1_kv',
  'q': 'attn.q',
  'kv': 'attn.kv',
  'proj': 'attn.proj',
  'norm_mlp': 'norm2',
  'mlp': 'mlp',
}
_READOUT_MODULES = {'readout_norm': 'readout_norm', 'fc_norm': 'fc_norm', 'head': 'fc'}
_LEAVES = {
  'kernel': 'weight',
  'bias': 'bias',
  'scale': 'weight',
  'mean': 'running_mean',
  'var': 'running_var',
}


class ReferenceMismatchError(AtlasError, ValueError):
  """A state dict that does not fit the model: names the missing, unexpected and mis-shaped tensors."""


def reference_name(path: tuple[str, ...]) -> str:
  """('params', 'stage0_block1', 'scale0', 'q', 'kernel') -> 'atlas_models.0.levels.0.blocks.1.blocks.0.attn.q.weight'."""
  modules, leaf = list(path[1:-1]), _LEAVES[path[-1]]
  head = modules.pop(0)
  if head == 'stem':
    first = modules.pop(0)
    match = re.fullmatch(r'res([12])_(\d+)', first)
    if match:
      name = f'conv{match[1]}.{match[2]}.{_RESIDUAL_MODULES[modules.pop(0)]}'
    elif first in _STEM_MODULES:
      name = _STEM_MODULES[first]
    else:
      raise KeyError(f'{"/".join(path)} has no counterpart in the reference (a patchify stem?)')
    rest = '.'.join(modules)
    return f'atlas_models.0.patch_embed.{name}{"." + rest if rest else ""}.{leaf}'
  match = re.fullmatch(r'stage(\d+)_block(\d+)', head)
  if match:
    block = f'atlas_models.{match[1]}.levels.0.blocks.{match[2]}'
    kind, index = re.fullmatch(r'(scale|position)(\d+)', modules[0]).groups()
    if kind == 'position':
      return f'{block}.posemb.{index}.projector.{ {"fc1": 0, "fc2": 2}[modules[1]] }.{leaf}'
    name = _SCALE_MODULES[modules[1]] + ''.join('.' + m for m in modules[2:])
    return f'{block}.blocks.{index}.{name}.{leaf}'
  if head == 'readout':
    return f'{_READOUT_MODULES[modules[0]]}.{leaf}'
  raise KeyError(f'{"/".join(path)} has no counterpart in the reference')


def _to_flax_layout(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
  if path[-1] == 'kernel' and array.ndim == 2:
    return array.T
  if path[-1] == 'kernel' and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array


def _reference_shape(shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
  if path[-1] == 'kernel' and len(shape) == 2:
    return shape[::-1]
  if path[-1] == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def is_unused_reference_key(name: str) -> bool:
  return any(pattern.match(name) for pattern in UNUSED_REFERENCE_KEYS)


def variables_from_reference(state_dict: Mapping[str, np.ndarray], abstract_variables) -> dict:
  """Maps a reference state dict onto the tree of `abstract_variables` (shapes from jax.eval_shape).

  Raises ReferenceMismatchError naming every missing, unexpected or mis-shaped tensor; nothing is partial.
  """
  flat = flax.traverse_util.flatten_dict(param_tree.unstack_blocks(flax.core.unfreeze(abstract_variables)))
  converted, missing, misshaped, used = {}, [], [], set()
  for path, abstract in flat.items():
    name = reference_name(path)
    if name not in state_dict:
      missing.append(name)
      continue
    used.add(name)
    array = _to_flax_layout(np.asarray(state_dict[name]), path)
    if array.shape != tuple(abstract.shape):
      misshaped.append(
        f'{name} {tuple(np.shape(state_dict[name]))} (expected '
        f'{_reference_shape(tuple(abstract.shape), path)})'
      )
      continue
    converted[path] = array.astype(abstract.dtype)
  unexpected = sorted(name for name in state_dict if name not in used and not is_unused_reference_key(name))
  problems = [
    f'{label}: {_first_names(names)}'
    for label, names in (('missing', missing), ('unexpected', unexpected), ('wrong shape', misshaped))
    if names
  ]
  if problems:
    raise ReferenceMismatchError('the state dict does not fit the model; ' + '; '.join(problems))
  return param_tree.stack_blocks(flax.traverse_util.unflatten_dict(converted))


def _first_names(names: list[str], shown: int = 5) -> str:
  """The first `shown` names and how many more: a message stays one readable line for any checkpoint."""
  more = f' and {len(names) - shown} more' if len(names) > shown else ''
  return ', '.join(names[:shown]) + more


def reference_shapes(abstract_variables) -> dict[str, tuple[int, ...]]:
  """The state dict the model of `abstract_variables` takes: reference name -> the reference's shape."""
  flat = flax.traverse_util.flatten_dict(param_tree.unstack_blocks(flax.core.unfreeze(abstract_variables)))
  return {reference_name(path): _reference_shape(tuple(leaf.shape), path) for path, leaf in flat.items()}


def _indices(names, pattern: str) -> list[int]:
  return sorted({int(match[1]) for name in names if (match := re.match(pattern, name))})


def describe_reference(shapes: Mapping[str, tuple[int, ...]]) -> dict:
  """What a reference state dict (name -> shape) holds, as the config's model fields name it: `dim`,
  `depths` (blocks per macro-stage), `num_classes`, `scales` (of the first stage: every scale), `mlp_ratio`
  and the stem (`stem`: 'conv' or 'patchify'; `patch_size`, `stem_in_dim`, `stem_width`). A field the
  tensors do not show is None. The attention's head count is no tensor's shape: it is not here."""
  names = list(shapes)
  first = 'atlas_models.0.levels.0.blocks.0.blocks.0.'
  dim = next((shapes[name][0] for name in ('fc_norm.weight', 'readout_norm.weight') if name in shapes), None)
  if dim is None and f'{first}attn.q.weight' in shapes:
    dim = shapes[f'{first}attn.q.weight'][0]
  hidden = shapes.get(f'{first}mlp.fc1.weight')
  stem = 'atlas_models.0.patch_embed.'
  description = {
    'dim': dim,
    'depths': tuple(
      len(_indices(names, rf'atlas_models\.{stage}\.levels\.0\.blocks\.(\d+)\.'))
      for stage in _indices(names, r'atlas_models\.(\d+)\.levels\.')
    )
    or None,
    'num_classes': shapes['fc.weight'][0] if 'fc.weight' in shapes else None,
    'scales': len(_indices(names, r'atlas_models\.0\.levels\.0\.blocks\.0\.blocks\.(\d+)\.')) or None,
    'mlp_ratio': hidden[0] // dim if hidden and dim and hidden[0] % dim == 0 else None,
    'stem': None,
    'patch_size': None,
    'stem_in_dim': None,
    'stem_width': None,
  }
  if f'{stem}conv0.0.weight' in shapes:  # the reference's conv stem: two convs, residual stages, 16 px
    description.update(
      stem='conv',
      patch_size=16,
      stem_in_dim=shapes[f'{stem}conv0.0.weight'][0],
      stem_width=shapes.get(f'{stem}conv0.3.weight', (None,))[0],
    )
  else:  # one strided conv over patches: (dim, 3, p, p)
    kernels = [shape for name, shape in shapes.items() if name.startswith(stem) and len(shape) == 4]
    if len(kernels) == 1:
      description.update(stem='patchify', patch_size=kernels[0][2])
  return description


def describe(description: Mapping) -> str:
  """`describe_reference`'s fields in words: 'dim 32, depths (1, 1), 10 classes, conv stem (...), ...'."""
  stem = {
    'conv': (
      f'conv stem (patch {description["patch_size"]}, stem_in_dim {description["stem_in_dim"]}, '
      f'stem_width {description["stem_width"]})'
    ),
    'patchify': f'patchify stem (patch {description["patch_size"]})',
  }.get(description['stem'], 'no stem found')
  depths = description['depths']
  return (
    f'dim {description["dim"]}, depths {tuple(depths) if depths else None}, '
    f'{description["num_classes"]} classes, {stem}, {description["scales"]} scales, '
    f'mlp_ratio {description["mlp_ratio"]}'
  )
