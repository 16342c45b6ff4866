"""XLA cost analysis of the conv stem's inference forward with and without BatchNorm folded into its convs.

python experiments/stem_folding/measure.py [--output=experiments/stem_folding/results.json]

For the conv stem of Atlas-B at 1024 px, batch 1, float32 and bfloat16 compute (float32 parameters, as in
training and inference), it compiles the plain inference forward (`ConvStem.apply`, train=False: conv, then
BN from its running averages; "before") and `folded_stem.folded_stem` (one conv per pair with the folded
kernel and bias; "after") for this machine's backend from jax.ShapeDtypeStructs (nothing big is allocated),
after checking on small random inputs and statistics that both compute the same. It prints as JSON XLA's
`cost_analysis()` ('flops', 'bytes accessed') and op counts of the compiled HLO (convolutions, fusions in
the entry computation, and those of them whose output is an activation map). The rest of the model is the
same program either way, so the stem's difference is the model's. These are XLA's estimates for the
backend it runs on (CPU here), not timings; on CPU each BN is already fused into the elementwise pass that
follows its conv, so folding removes no pass there.
"""

import argparse
import collections
import functools
import json
import pathlib
import re
import sys
import time
from unittest import mock

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `python experiments/stem_folding/measure.py` from anywhere
  sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from atlas_jax import config as config_lib  # noqa: E402
from atlas_jax.models import DTYPES  # noqa: E402
from atlas_jax.models import stem as stem_module  # noqa: E402
from atlas_jax.models.stem import ConvStem  # noqa: E402
from configs import common  # noqa: E402
from experiments.stem_folding import folded_stem  # noqa: E402

HERE = pathlib.Path(__file__).parent
VARIANT, RESOLUTION, BATCH = 'B', 1024, 1

# An entry-computation fusion: '%name = TYPE[dims]{layout} fusion(...), kind=kLoop, calls=%computation, ...'.
FUSION = re.compile(r'^\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* fusion\(.*?kind=(k\w+), calls=(%[\w.-]+)')
# A computation's header line: '%name (params) -> type {'.
COMPUTATION = re.compile(r'^(?:ENTRY )?(%[\w.-]+) .*\{$')


def computations(hlo: str) -> dict:
  """Name -> the instruction lines of each computation of a module's text."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    header = COMPUTATION.match(line)
    if header:
      name = header.group(1)
      bodies[name] = []
    elif line == '}':
      name = None
    elif name is not None and ' = ' in line:
      bodies[name].append(line)
  return bodies


def hlo_counts(hlo: str, batch: int) -> dict:
  """Op counts of a compiled module's text: convolutions in every computation; entry fusions by kind; the
  elementwise (kLoop) ones whose output is an activation map (batch, h, w, c) rather than a parameter, and
  the per-element instructions inside those (BN's subtract and multiplies show up there)."""
  bodies = computations(hlo)
  entry = next(body for name, body in bodies.items() if f'ENTRY {name} ' in hlo)
  kinds, activation_loops, activation_ops = collections.Counter(), 0, 0
  for line in entry:
    match = FUSION.match(line)
    if match:
      dims = [int(d) for d in match.group(1).split(',') if d]
      kinds[match.group(2)] += 1
      # Kernels are (3, 3, in, out): an activation map has the batch first and more than 3 rows.
      if match.group(2) == 'kLoop' and len(dims) == 4 and dims[0] == batch and dims[1] > 3:
        activation_loops += 1
        # Per-element ops only: the fold's per-channel arithmetic, fused in too, has the shape (channels,).
        per_element = re.compile(
          r' = \w+\[' + match.group(1) + r'\]\S* (?!parameter|broadcast|bitcast|reshape)\w'
        )
        activation_ops += sum(bool(per_element.search(op)) for op in bodies[match.group(3)])
  return {
    'convolutions': len(re.findall(r' convolution\(', hlo)),
    'entry_fusions': sum(kinds.values()),
    'entry_fusions_by_kind': dict(sorted(kinds.items())),
    'activation_elementwise_fusions': activation_loops,
    'per_element_ops_in_activation_fusions': activation_ops,
  }


def compiled_costs(fn, *args) -> dict:
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one dict per device
  return {
    'flops': float(cost['flops']),
    'bytes_accessed': float(cost['bytes accessed']),
    **hlo_counts(compiled.as_text(), BATCH),
    'compile_s': round(time.perf_counter() - start, 2),
  }


def stem_and_variables(config, dtype: str, batch: int, size=None):
  model = config.model
  stem = ConvStem(dim=model.dim, width=model.stem_width, in_dim=model.stem_in_dim, dtype=DTYPES[dtype])
  # Atlas casts the images to its compute dtype before the stem.
  images = jax.ShapeDtypeStruct((batch, *(size or config.image_size), 3), DTYPES[dtype])
  return stem, images, jax.eval_shape(stem.init, jax.random.key(0), images)


def forward(stem, fold: bool):
  if fold:
    return lambda variables, images: folded_stem.folded_stem(variables, images, stem.dtype)
  return lambda variables, images: stem.apply(variables, images)


def check_equal(config) -> float:
  """The folded forward equals the plain one (float32, random BN statistics): the largest relative error."""
  stem, images, _ = stem_and_variables(config, 'float32', 2, (64, 64))
  keys = jax.random.split(jax.random.key(1), 3)
  images = jax.random.normal(keys[0], images.shape)
  variables = stem.init(keys[1], images)
  leaves, tree = jax.tree.flatten(variables['batch_stats'])
  noisy = [
    jnp.abs(jax.random.normal(key, leaf.shape)) + 0.5
    for key, leaf in zip(jax.random.split(keys[2], len(leaves)), leaves)
  ]
  variables = {**variables, 'batch_stats': jax.tree.unflatten(tree, noisy)}
  plain = jax.jit(forward(stem, False))(variables, images)
  folded = jax.jit(forward(stem, True))(variables, images)
  error = float(jnp.abs(folded - plain).max() / jnp.abs(plain).max())
  if error > 1e-5:
    raise AssertionError(f'the folded stem differs from the plain one by {error:.2e} relative')
  return error


def measure_stem(config, dtype: str, fold: bool) -> dict:
  stem, images, variables = stem_and_variables(config, dtype, BATCH)
  return compiled_costs(forward(stem, fold), variables, images)


def measure_stem_training(config, dtype: str, one_pass_variance: bool) -> dict:
  """The stem's training forward and backward (batch statistics, their update, gradients of a mean), with
  BatchNorm's variance in two passes (E[(x - mean)^2], today's) or one (E[x^2] - mean^2)."""
  batch_norm = functools.partial(nn.BatchNorm, momentum=0.9, use_fast_variance=one_pass_variance)
  with mock.patch.object(stem_module, 'BatchNorm', batch_norm):
    stem, images, variables = stem_and_variables(config, dtype, BATCH)

    def loss(params, batch_stats, images):
      out, updates = stem.apply(
        {'params': params, 'batch_stats': batch_stats}, images, True, mutable=['batch_stats']
      )
      return out.astype(jnp.float32).mean(), updates

    grad = jax.grad(loss, has_aux=True)
    return compiled_costs(grad, variables['params'], variables['batch_stats'], images)


def change(before: dict, after: dict) -> dict:
  return {
    key: {'before': before[key], 'after': after[key], 'ratio': round(after[key] / before[key], 6)}
    for key in ('flops', 'bytes_accessed')
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--output', default=HERE / 'results.json', type=pathlib.Path)
  args = parser.parse_args()
  config = config_lib.resolve(common.base_config(VARIANT, RESOLUTION))
  rows = []
  folded_error = check_equal(config)
  for part, measure in (('stem', measure_stem),):
    for dtype in ('float32', 'bfloat16'):
      for fold in (False, True):
        row = {'part': part, 'dtype': dtype, 'fold_batch_norm': fold, **measure(config, dtype, fold)}
        rows.append(row)
        print(json.dumps(row), flush=True)

  def find(part, dtype, fold):
    return next(r for r in rows if (r['part'], r['dtype'], r['fold_batch_norm']) == (part, dtype, fold))

  training_rows = []
  for dtype in ('float32', 'bfloat16'):
    for one_pass in (False, True):
      row = {'part': 'stem_training', 'dtype': dtype, 'one_pass_variance': one_pass}
      row.update(measure_stem_training(config, dtype, one_pass))
      training_rows.append(row)
      print(json.dumps(row), flush=True)

  def find_training(dtype, one_pass):
    return next(r for r in training_rows if (r['dtype'], r['one_pass_variance']) == (dtype, one_pass))

  results = {
    'what': f'Atlas-{VARIANT} {RESOLUTION} px, batch {BATCH}, inference forward (train=False), '
    'XLA cost_analysis of the compiled program; fold_batch_norm False = before, True = after',
    'note': 'XLA estimates for this backend, not timings. On CPU each BN is already fused into the '
    'elementwise pass after its conv (activation_elementwise_fusions is unchanged), so folding only drops '
    'the per-element BN arithmetic, and in float32 adds a pass over the kernels to fold them',
    'backend': jax.default_backend(),
    'jax': jax.__version__,
    'folded_vs_plain_max_relative_error_float32': folded_error,
    'rows': rows,
    'summary': {
      f'{part}/{dtype}': change(find(part, dtype, False), find(part, dtype, True))
      for part in ('stem',)
      for dtype in ('float32', 'bfloat16')
    },
    'training_what': 'the stem training step (forward with batch statistics, backward), two-pass '
    '(before) against one-pass (after) BatchNorm variance',
    'training_rows': training_rows,
    'training_summary': {
      dtype: change(find_training(dtype, False), find_training(dtype, True))
      for dtype in ('float32', 'bfloat16')
    },
  }
  args.output.write_text(json.dumps(results, indent=2) + '\n')
  print(json.dumps(results['summary'], indent=2))


if __name__ == '__main__':
  main()
