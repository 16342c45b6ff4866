"""The training console line: its format, the ETA with a fake clock, durations."""

import math

import jax.numpy as jnp
import pytest

from atlas_jax import progress


def test_progress_line_and_eta_with_a_fake_clock():
  now = [100.0]
  line = progress.Progress(total_steps=2000, start_step=100, clock=lambda: now[0])
  first = line.line(120, {'loss': 1.23456, 'lr': 4e-4, 'images_per_s': 312.44})
  assert first == 'step 120/2000 (6.0%)  loss 1.2346  lr 4.0e-04  312.4 img/s  ETA --:--:--'
  now[0] += 80.0  # 80 steps in 80 s: 1 s a step, 1800 steps left
  assert line.line(200, {'loss': jnp.asarray(1.0)}) == 'step 200/2000 (10.0%)  loss 1.0000  ETA 0:30:00'
  now[0] += 4000.0  # 4080 s for 1880 steps
  assert line.line(2000).endswith('(100.0%)  ETA 0:00:00')
  with pytest.raises(ValueError, match='before the start step'):
    line.line(99)


def test_metric_formats():
  line = progress.Progress(total_steps=10, clock=lambda: 0.0)
  text = line.line(
    1,
    {
      'count': 3,
      'flag': True,
      'big': 123456.0,
      'small': 1e-5,
      'zero': 0.0,
      'diverged': math.nan,
      'weights': 'ema',
      'skipped': None,
    },
  )
  assert text == (
    'step 1/10 (10.0%)  count 3  flag True  big 1.235e+05  small 1.000e-05  zero 0.0000  '
    'diverged nan  weights ema  ETA --:--:--'
  )
  with pytest.raises(ValueError, match='total_steps must be > 0'):
    progress.Progress(total_steps=0)


def test_format_duration():
  assert progress.format_duration(0) == '0:00:00'
  assert progress.format_duration(312.4) == '0:05:12'
  assert progress.format_duration(3661) == '1:01:01'
  assert progress.format_duration(90000) == '25:00:00'
  assert progress.format_duration(-5) == '0:00:00'
  assert progress.format_duration(math.nan) == '--:--:--'
  assert progress.format_duration(math.inf) == '--:--:--'
