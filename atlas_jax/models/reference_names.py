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
    f'{label}: {", ".join(names)}'
    for label, names in (('missing', missing), ('unexpected', unexpected), ('wrong shape', misshaped))
    if names
  ]
  if problems:
    raise ReferenceMismatchError('the state dict does not fit the model; ' + '; '.join(problems))
  return param_tree.stack_blocks(flax.traverse_util.unflatten_dict(converted))
