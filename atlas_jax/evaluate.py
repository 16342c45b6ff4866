"""Evaluation over a whole split: top-1, top-5 and cross-entropy, every example counted exactly once.

The last global batch is padded to full size and its padding masked out, so one compiled step serves
the whole split. Images get the eval transform (transforms.eval_transform: `data.resize`, squash or crop,
to the image size; or none: each image at its own size, every batch padded to a canvas of whole windows
(`canvas_multiple`) with each image's valid 'size', which the model masks; one step compiles per distinct
canvas, and such an evaluation takes a single process, `check_eval_resize`). An example that fails to
decode is masked out like padding and counted as skipped (pipeline.EvalLoader): the counted and the
skipped examples of all processes must add up to the split. `run` is `--config.mode=eval`: it evaluates
the workdir's best (else latest) checkpoint, or `init_from` when the workdir has none, with raw weights
and, when present, EMA weights.

Each evaluation also counts a confusion matrix (true class x top-1 prediction) and the top-5 hits of each
class; `evaluate_state` (given a workdir) and `run` write them as WORKDIR/eval/<step>[_ema]_per_class.csv
and _confusion.png (eval_report.py). They stay out of metrics.jsonl and TensorBoard: scalars only there.
"""

import json

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from atlas_jax import config as config_lib
from atlas_jax import eval_report, run_setup, sharding, storage, transfer
from atlas_jax import metrics as metrics_lib
from atlas_jax.models import build_model

# Per-class results of `evaluate`, beside its scalars: arrays, kept out of the metrics records.
REPORT_KEYS = ('confusion', 'top5_hits')


def make_eval_step(model, num_classes: int):
  """(variables, batch {'image', 'label', 'mask'}) -> sums over the real examples of the batch: top1, top5,
  loss, examples, and int32 confusion (num_classes x num_classes, [true, top-1 prediction]) and top5_hits
  (num_classes: examples of each true class with it among the top 5)."""
  top_k = min(5, num_classes)

  def eval_step(variables, batch):
    # data.resize='none': each image's valid region; without it the model is called as any flax classifier.
    sizes = {'sizes': batch['size']} if 'size' in batch else {}
    logits = model.apply(variables, batch['image'], train=False, **sizes)
    labels = batch['label'].astype(jnp.int32)
    mask = batch['mask'].astype(jnp.float32)
    _, predicted = jax.lax.top_k(logits, top_k)  # (B, k)
    correct_top1 = (predicted[:, 0] == labels).astype(jnp.float32)
    correct_top5 = jnp.any(predicted == labels[:, None], axis=1).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    losses = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    # One-hot products count exactly at any matmul precision (0/1 inputs); padding rows are all zero.
    true = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[:, None]
    top1_predicted = jax.nn.one_hot(predicted[:, 0], num_classes, dtype=jnp.float32)
    return {
      'top1': jnp.sum(correct_top1 * mask),
      'top5': jnp.sum(correct_top5 * mask),
      'loss': jnp.sum(losses * mask),
      'examples': jnp.sum(mask),
      'confusion': jnp.einsum('bt,bp->tp', true, top1_predicted).astype(jnp.int32),
      'top5_hits': jnp.einsum('bt,b->t', true, correct_top5).astype(jnp.int32),
    }

  return eval_step


def evaluate(
  eval_step,
  variables,
  source,
  batch_size: int,
  mesh,
  workers: int,
  transform,
  max_bad_fraction: float,
  canvas_multiple: int | None = None,
) -> dict:
  """{'top1', 'top5', 'loss', 'examples'} of `variables` over every example of `source` that decodes, and
  the int64 arrays 'confusion' (true class x top-1 prediction) and 'top5_hits' (per true class).
  `canvas_multiple`: images at their own sizes, each batch padded to a canvas of that multiple."""
  from atlas_jax.data import pipeline  # the data libraries: kept out of module scope

  totals = {'top1': 0.0, 'top5': 0.0, 'loss': 0.0, 'examples': 0.0}
  counts = {key: 0 for key in REPORT_KEYS}
  with pipeline.EvalLoader(
    source,
    batch_size,
    # Processes of one spatial group load the same examples, each keeping its own rows.
    process_index=sharding.process_batch_slot(mesh)[0],
    process_count=sharding.process_batch_slot(mesh)[1],
    workers=workers,
    transform=transform,
    max_bad_fraction=max_bad_fraction,
    canvas_multiple=canvas_multiple,
  ) as loader:
    for local_batch in loader:
      sums = eval_step(variables, sharding.global_batch(local_batch, mesh))
      for key in REPORT_KEYS:
        counts[key] = counts[key] + _to_host(sums.pop(key)).astype(np.int64)
      sums = jax.device_get(sums)
      for key in totals:
        totals[key] += float(sums[key])
    skipped = loader.skipped
  if jax.process_count() > 1:  # each process knows the bad examples of its own slices
    skipped = int(np.sum(multihost_utils.process_allgather(np.int64(skipped))))
  examples = totals.pop('examples')
  if examples + skipped != len(source):
    raise RuntimeError(
      f'evaluation counted {examples:.0f} examples and skipped {skipped} bad ones, the '
      f'split has {len(source)}'
    )
  if skipped:
    logging.warning('evaluation skipped %d of %d examples that failed to decode', skipped, len(source))
  return {**{key: value / examples for key, value in totals.items()}, 'examples': int(examples), **counts}


def _to_host(value) -> np.ndarray:
  """A global array of the step as numpy on every process, also when the compiler left it sharded (its
  class axis may follow an FSDP-sharded head)."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable and not value.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return np.asarray(jax.device_get(value))


def scalars(result: dict) -> dict:
  """`evaluate`'s result without the per-class arrays: what metrics.jsonl and TensorBoard get."""
  return {key: value for key, value in result.items() if key not in REPORT_KEYS}


def source_class_names(config, source) -> list[str]:
  """The name of each of the model's classes as the data source numbers them: a folder's or a tfds
  dataset's class names (`data.classes`' when set), the synthetic task's four, else the index; classes past
  the source's are named by index. What training writes to WORKDIR/labels.txt."""
  from atlas_jax import inference  # the model and data libraries: kept out of module scope

  names = list(getattr(source, 'classes', None) or ())
  if not names and config.data.source == 'synthetic':
    names = list(inference.sources.synthetic.class_names(config.data))
  names = [str(name) for name in names[: config.model.num_classes]]
  return names + [str(index) for index in range(len(names), config.model.num_classes)]


def class_labels(config, source) -> list[str]:
  """The name of each of the model's classes for the reports: `source_class_names`, WordNet IDs made
  readable."""
  from atlas_jax import inference

  readable = inference.readable_names()
  return [readable.get(name, name) for name in source_class_names(config, source)]


def write_reports(workdir, step: int, weights: str, result: dict, class_names) -> None:
  """WORKDIR/eval/<step>[_<weights>]_per_class.csv and _confusion.png of a result, on process 0 only."""
  if jax.process_index() != 0:
    return
  csv_path, png_path = eval_report.report_paths(workdir, step, weights)
  eval_report.write_per_class_csv(csv_path, result['confusion'], result['top5_hits'], class_names)
  eval_report.write_confusion_png(png_path, result['confusion'], class_names)


def eval_options(config) -> dict:
  """The data arguments of `evaluate` from `config`: workers, eval transform, bad-example limit, and the
  canvas multiple of `data.resize='none'` (None otherwise)."""
  from atlas_jax.data import transforms

  return {
    'workers': config.data.workers,
    'transform': transforms.eval_transform(config),
    'max_bad_fraction': config.data.max_bad_fraction,
    'canvas_multiple': canvas_multiple(config),
  }


def canvas_multiple(config) -> int | None:
  """With `data.resize='none'` on real data, the side every eval canvas is a multiple of: one whole window of
  patches (model.patch_size * model.window), so batches of nearby sizes share a canvas and a compiled step;
  None otherwise."""
  if config.data.resize != 'none' or config.data.source == 'synthetic':
    return None
  return int(config.model.patch_size) * int(config.model.window)


def check_eval_resize(config) -> None:
  """Refuses `data.resize='none'` in a multi-process run before anything starts: each process would pad its
  slice of a batch to its own canvas, and the global batch could not be put together."""
  if canvas_multiple(config) is not None and jax.process_count() > 1:
    raise config_lib.ConfigError(
      f"config.data.resize='none' evaluates in one process only, this run has {jax.process_count()}: "
      'evaluate with --config.data.resize=squash (or crop), or run mode=eval in a single process'
    )


def evaluate_state(config, eval_step, state, source, mesh, workdir=None, step=None) -> dict:
  """{'raw': results} and, with EMA on, {'ema': results}, of a train state: the scalars of `evaluate`.

  With a `workdir`, also writes the per-class reports of each weight set there (`write_reports`), named by
  `step` (default: the state's).
  """
  weights = {'raw': state.params}
  if state.ema_params is not None:
    weights['ema'] = state.ema_params
  if workdir is not None and step is None:
    step = int(jax.device_get(state.step))
  names = class_labels(config, source) if workdir is not None and jax.process_index() == 0 else None
  results = {}
  for name, params in weights.items():
    variables = run_setup.model_variables(params, state.batch_stats)
    result = evaluate(eval_step, variables, source, config.eval.batch_size, mesh, **eval_options(config))
    if workdir is not None:
      write_reports(workdir, step, name, result, names)
    results[name] = scalars(result)
  return results


def each_replicated(weights: dict, mesh):
  """(name, variables placed whole on every device of `mesh`) for each weight set, under the mesh."""
  with jax.set_mesh(mesh):
    for name, variables in weights.items():
      yield name, jax.device_put(variables, sharding.replicated(mesh))


def run(config, workdir, force_unlock: bool = False) -> dict:
  """`--config.mode=eval`: evaluates, appends the results to WORKDIR/metrics.jsonl and writes the per-class
  reports to WORKDIR/eval/, holding WORKDIR/lock meanwhile (`force_unlock` takes it over)."""
  from atlas_jax.data import sources

  config = config_lib.resolve(config)
  check_eval_resize(config)
  workdir = storage.path(workdir)  # local, or gs:// (atlas_jax/storage.py)
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(config.eval.batch_size, mesh, 'config.eval.batch_size')
  source = sources.make_source(
    config.data, config.image_size, 'validation', config.seed, num_classes=config.model.num_classes
  )
  model = build_model(config, dtype=run_setup.compute_dtype(config))
  abstract = run_setup.abstract_variables(model, config.image_size)
  run_setup.print_start_lines(config, mesh, abstract['params'])
  lock = run_setup.take_workdir_lock(config, workdir, 'evaluation', force_unlock)
  try:
    return _evaluate_workdir(config, workdir, mesh, source, model, abstract)
  finally:
    lock.release()


def _evaluate_workdir(config, workdir, mesh, source, model, abstract) -> dict:
  weights, step, source_name = transfer.weights_to_evaluate(config, workdir, abstract)

  eval_step = jax.jit(make_eval_step(model, config.model.num_classes))
  names = class_labels(config, source) if jax.process_index() == 0 else None
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  results = {}
  try:
    for name, variables in each_replicated(weights, mesh):
      result = evaluate(eval_step, variables, source, config.eval.batch_size, mesh, **eval_options(config))
      write_reports(workdir, step, name, result, names)
      results[name] = scalars(result)
      writer.write(step, 'eval', {**results[name], 'weights': name})
      if jax.process_index() == 0:
        print(
          f'evaluated {source_name}, {WEIGHT_NAMES[name]}: {result_text(config, results[name])}', flush=True
        )
        print(json.dumps({'step': step, 'weights': name, **results[name]}), flush=True)
  finally:
    writer.close()
  return results


WEIGHT_NAMES = {'raw': 'raw weights', 'ema': 'EMA weights'}


def result_text(config, result: dict) -> str:
  """E.g. 'top-1 0.5190  loss 1.2345'; top-5 between them only with more than 5 classes (else it is 1)."""
  parts = [f'top-1 {result["top1"]:.4f}']
  if config.model.num_classes > 5:
    parts.append(f'top-5 {result["top5"]:.4f}')
  parts.append(f'loss {result["loss"]:.4f}')
  return '  '.join(parts)
