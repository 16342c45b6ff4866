"""The training console line: step/total, percentage, the logged metrics and the ETA.

E.g. 'step 120/2000 (6.0%)  loss 1.2345  lr 4.0e-04  312.4 img/s  ETA 0:05:12'. train.py prints one every
logging step, among other log lines, so it is a plain line rather than a redrawn bar (predict.py's bar is
tqdm's). Durations are 'H:MM:SS' at every length: tqdm's `format_interval` writes 'MM:SS' under an hour.
"""

from collections.abc import Mapping
import math
import time
from typing import Any, Callable

from atlas_jax.metrics import to_python_scalar


def format_duration(seconds: float) -> str:
  """'H:MM:SS' (hours not wrapped at 24), rounded to the second; '--:--:--' when not finite."""
  if not math.isfinite(seconds):
    return '--:--:--'
  total = max(0, round(seconds))
  hours, rest = divmod(total, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}'


def _format_metric(key: str, value: Any) -> str:
  numeric = isinstance(value, (int, float))  # bool included
  if key == 'images_per_s' and numeric:
    return f'{value:.1f} img/s'
  if key == 'lr' and numeric:
    return f'lr {value:.1e}'
  if isinstance(value, int):
    return f'{key} {value}'
  if isinstance(value, float):
    if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5:
      return f'{key} {value:.4f}'
    return f'{key} {value:.3e}'
  return f'{key} {value}'


class Progress:
  """The console progress line of a run of `total_steps` steps that (re)started at `start_step`.

  The first call to `line` sets the baseline (its time and step): the ETA uses the average time per step
  since then, which leaves out what came before it, such as compiling the train step. A step before
  `start_step` is a caller error.
  """

  def __init__(self, total_steps: int, start_step: int = 0, clock: Callable[[], float] = time.monotonic):
    if total_steps <= 0:
      raise ValueError(f'total_steps must be > 0, got {total_steps}')
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.clock = clock
    self._baseline: tuple[float, int] | None = None

  def eta_seconds(self, step: int) -> float:
    """Seconds left at the average pace since the baseline (which the first call sets); NaN before a pace
    is known."""
    now = self.clock()
    if self._baseline is None:
      self._baseline = (now, step)
    baseline_time, baseline_step = self._baseline
    if step >= self.total_steps:
      return 0.0
    if step <= baseline_step:
      return math.nan
    return (now - baseline_time) / (step - baseline_step) * (self.total_steps - step)

  def line(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
    """E.g. 'step 120/2000 (6.0%)  loss 1.2345  lr 4.0e-04  312.4 img/s  ETA 0:05:12'."""
    step = int(step)
    if step < self.start_step:
      raise ValueError(f'step {step} is before the start step {self.start_step}')
    parts = [f'step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)']
    for key, value in (metrics or {}).items():
      value = to_python_scalar(value, key)
      if value is not None:
        parts.append(_format_metric(key, value))
    parts.append(f'ETA {format_duration(self.eta_seconds(step))}')
    return '  '.join(parts)


def closing_lines(
  records: list[Mapping[str, Any]], total_steps: int, num_classes: int, checkpoint_dir, workdir
) -> list[str]:
  """What a finished run prints last: the final validation top-1 against chance, the best step and its
  checkpoint (the one predict and mode=eval restore by default), and the command that classifies with it.
  `records` are metrics.jsonl's; [] when the run has no evaluation at `total_steps` (it stopped early)."""
  evals = {}  # step -> the best top-1 of its weights (raw, EMA): what the checkpoint was saved with
  for record in records:
    if record.get('kind') == 'eval' and 'top1' in record:
      evals[record['step']] = max(evals.get(record['step'], -1.0), float(record['top1']))
  if total_steps not in evals:
    return []
  final = [r for r in records if r.get('kind') == 'eval' and r['step'] == total_steps and 'top1' in r]
  final_top1 = next((float(r['top1']) for r in final if r.get('weights') == 'raw'), evals[total_steps])
  best_top1, best_step = max((top1, step) for step, top1 in evals.items())  # ties: the later step
  chance = f' (chance {100.0 / num_classes:.1f}%)' if num_classes > 1 else ''
  return [
    f'final validation top-1 {100 * final_top1:.1f}%{chance} at step {total_steps}; '
    f'best {100 * best_top1:.1f}% at step {best_step}, checkpoint {checkpoint_dir}/{best_step}',
    f'classify images with: python -m atlas_jax.predict --checkpoint={workdir} IMAGE_OR_FOLDER...',
  ]
