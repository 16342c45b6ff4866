"""The benchmark: FLOP counting, the fast-path check catching planted faults, and its command line on CPU."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from atlas_jax import benchmark
from atlas_jax import config as config_lib
from atlas_jax.models import build_model, layers, msa
from configs import atlas_b_1024
from tests.train_configs import ROOT, command_line_overrides, tiny_config


class Planted:
  """A model whose apply runs with `module.name` replaced: a fault in the fast path only."""

  def __init__(self, model, module, name, replacement):
    self.model, self.module, self.name, self.replacement = model, module, name, replacement

  def apply(self, *args, **kwargs):
    original = getattr(self.module, self.name)
    setattr(self.module, self.name, self.replacement)
    try:
      return self.model.apply(*args, **kwargs)
    finally:
      setattr(self.module, self.name, original)


def _scale_block_without_second_mlp(
  self, tokens, keys, values, deterministic, drop_path_rate=None, key_mask=None
):
  """ScaleBlock.__call__ that skips the MLP for the bottom-up queries (fewer queries than keys)."""
  rows, length, _ = tokens.shape
  query = self.q(self.norm_q(tokens)).reshape(rows, length, self.num_heads, self.dim // self.num_heads)
  attended = msa.dot_product_attention(
    query, keys.astype(query.dtype), values.astype(query.dtype), self.attention, key_mask
  )
  tokens = tokens + self.proj(attended.reshape(rows, length, self.dim))
  if length < keys.shape[1]:
    return tokens
  return tokens + self.mlp(self.norm_mlp(tokens))


def test_model_flops_of_atlas_b_1024_match_the_reference_count():
  # docs/model.md (the reference figures): 785 forward GFLOPs per image for the reference Atlas-B at 1024 px.
  assert benchmark.model_flops_per_image(atlas_b_1024.get_config()) / 1e9 == pytest.approx(785.3, abs=0.1)


def test_jaxpr_flops_counts_dots_convolutions_and_scans():
  def network(kernel, conv_kernel, x):
    y = jax.lax.conv_general_dilated(
      x, conv_kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )  # 2*8*8*4*(3*3*3)
    y = y.reshape(2, -1) @ kernel  # 2*2*256*5
    return jax.lax.scan(lambda carry, _: (carry @ jnp.ones((5, 5)), None), y, None, length=3)[0]  # 3*2*2*5*5

  jaxpr = jax.make_jaxpr(network)(jnp.ones((256, 5)), jnp.ones((3, 3, 3, 4)), jnp.ones((2, 8, 8, 3)))
  assert benchmark.jaxpr_flops(jaxpr.jaxpr) == 2 * 2 * 8 * 8 * 4 * 27 + 2 * 2 * 256 * 5 + 3 * 2 * 2 * 5 * 5


@pytest.mark.parametrize(
  'dtype, fault', [('bfloat16', None), ('float32', 'tanh_gelu'), ('bfloat16', 'no_second_mlp')]
)
def test_fast_path_check_passes_a_clean_model_and_catches_planted_faults(dtype, fault):
  config = config_lib.resolve(tiny_config(model__dtype=dtype))
  model = build_model(config)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  fast_model = {
    None: model,
    'tanh_gelu': Planted(model, layers, 'gelu', functools.partial(nn.gelu, approximate=True)),
    'no_second_mlp': Planted(model, msa.ScaleBlock, '__call__', _scale_block_without_second_mlp),
  }[fault]
  difference, ok = benchmark.fast_path_check(
    config, variables['params'], variables.get('batch_stats'), fast_model
  )
  assert ok == (fault is None), difference


def test_command_line_prints_the_design_fields_without_the_data_pipeline(tmp_path):
  # Block the data pipeline and TensorFlow: the benchmark must not need them.
  blocker = (
    "import sys, runpy; sys.modules['atlas_jax.data'] = None; sys.modules['tensorflow'] = None; "
    "sys.argv = ['benchmark'] + sys.argv[1:]; runpy.run_module('atlas_jax.benchmark', run_name='__main__')"
  )
  command = [
    sys.executable,
    '-c',
    blocker,
    '--config=configs/quickstart.py',
    '--batch_size=4',
    '--steps=2',
    '--warmup=1',
    f'--output={tmp_path / "results.jsonl"}',
    *command_line_overrides(),
  ]
  result = subprocess.run(
    command,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'PYTHONPATH': str(ROOT)},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in (tmp_path / 'results.jsonl').read_text().splitlines()]
  assert [line['mode'] for line in lines] == ['infer', 'train']
  fields = {
    'config',
    'model',
    'image_size',
    'batch_size',
    'mode',
    'images_per_s',
    'step_ms_median',
    'compile_s',
    'peak_mem_gib',
    'model_flops_per_image',
    'xla_flops_per_image',
    'mfu',
    'peak_tflops',
    'device',
    'jax_version',
    'dtype',
    'attention',
    'remat',
  }
  for line in lines:
    assert fields <= set(line) and line['images_per_s'] > 0 and line['peak_mem_gib'] > 0
    assert line['mesh'] == {'data': 1, 'fsdp': 1, 'spatial': 1}  # config.mesh's axes on one device
  assert lines[1]['model_flops_per_image'] == 3 * lines[0]['model_flops_per_image']


def test_device_time_by_op_reads_a_trace_without_tensorboard(tmp_path):
  import jax
  import jax.numpy as jnp

  from atlas_jax import benchmark

  step = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  matrix = jnp.ones((256, 256))
  step(matrix).block_until_ready()
  benchmark._trace(lambda: step(matrix), 2, str(tmp_path))
  summary = benchmark.device_time_by_op(str(tmp_path), steps=2)
  (total_name, total_ms), *ops = summary['ops']
  assert total_name == 'total' and total_ms > 0
  assert ops and all(ms >= 0 for _, ms in ops)
  assert sum(ms for _, ms in ops) <= total_ms * (1 + 1e-6)
  with pytest.raises(FileNotFoundError, match='xplane'):
    benchmark.device_time_by_op(str(tmp_path / 'missing'), steps=1)
