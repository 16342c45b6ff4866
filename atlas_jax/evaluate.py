"""Evaluation over a whole split: top-1, top-5 and cross-entropy, every example counted exactly once.

The last global batch is padded to full size and its padding masked out, so one compiled step serves
the whole split. Images get the eval transform (transforms.eval_transform: bicubic resize to the image
size). An example that fails to decode is masked out like padding and counted as skipped
(pipeline.EvalLoader): the counted and the skipped examples of all processes must add up to the split.
`run` is `--config.mode=eval`: it evaluates the workdir's best (else latest) checkpoint, or `init_from`
when the workdir has none, with raw weights and, when present, EMA weights.
"""

import json
import pathlib

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from atlas_jax import checkpointing, run_setup, sharding, transfer
from atlas_jax import config as config_lib
from atlas_jax import metrics as metrics_lib
from atlas_jax import workdir as workdir_lib
from atlas_jax.models import build_model


def make_eval_step(model, num_classes: int):
  """(variables, batch {'image', 'label', 'mask'}) -> sums over the real examples of the batch."""
  top_k = min(5, num_classes)

  def eval_step(variables, batch):
    logits = model.apply(variables, batch['image'], train=False)
    labels = batch['label'].astype(jnp.int32)
    mask = batch['mask'].astype(jnp.float32)
    _, predicted = jax.lax.top_k(logits, top_k)  # (B, k)
    correct_top1 = (predicted[:, 0] == labels).astype(jnp.float32)
    correct_top5 = jnp.any(predicted == labels[:, None], axis=1).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    losses = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    return {
      'top1': jnp.sum(correct_top1 * mask),
      'top5': jnp.sum(correct_top5 * mask),
      'loss': jnp.sum(losses * mask),
      'examples': jnp.sum(mask),
    }

  return eval_step


def evaluate(
  eval_step, variables, source, batch_size: int, mesh, workers: int, transform, max_bad_fraction: float
) -> dict:
  """{'top1', 'top5', 'loss', 'examples'} of `variables` over every example of `source` that decodes."""
  from atlas_jax.data import pipeline  # the data libraries: kept out of module scope

  totals = {'top1': 0.0, 'top5': 0.0, 'loss': 0.0, 'examples': 0.0}
  with pipeline.EvalLoader(
    source,
    batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    workers=workers,
    transform=transform,
    max_bad_fraction=max_bad_fraction,
  ) as loader:
    for local_batch in loader:
      sums = jax.device_get(eval_step(variables, sharding.global_batch(local_batch, mesh)))
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
  return {**{key: value / examples for key, value in totals.items()}, 'examples': int(examples)}


def eval_options(config) -> dict:
  """The data arguments of `evaluate` from `config`: workers, eval transform, bad-example limit."""
  from atlas_jax.data import transforms

  return {
    'workers': config.data.workers,
    'transform': transforms.eval_transform(config),
    'max_bad_fraction': config.data.max_bad_fraction,
  }


def evaluate_state(config, eval_step, state, source, mesh) -> dict:
  """{'raw': results} and, with EMA on, {'ema': results}, of a train state."""
  weights = {'raw': state.params}
  if state.ema_params is not None:
    weights['ema'] = state.ema_params
  results = {}
  for name, params in weights.items():
    variables = run_setup.model_variables(params, state.batch_stats)
    results[name] = evaluate(
      eval_step, variables, source, config.eval.batch_size, mesh, **eval_options(config)
    )
  return results


def run(config, workdir) -> dict:
  """`--config.mode=eval`: evaluates and appends the results to WORKDIR/metrics.jsonl."""
  from atlas_jax.data import sources

  config = config_lib.resolve(config)
  workdir = pathlib.Path(workdir)
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(config.eval.batch_size, mesh, 'config.eval.batch_size')
  source = sources.make_source(
    config.data, config.image_size, 'validation', config.seed, num_classes=config.model.num_classes
  )
  model = build_model(config, dtype=run_setup.compute_dtype(config))
  abstract = run_setup.abstract_variables(model, config.image_size)

  checkpoints_dir = workdir_lib.checkpoints_dir(workdir)
  has_checkpoints = checkpoints_dir.is_dir() and any(
    path.name.isdigit() for path in checkpoints_dir.iterdir()
  )
  weights = {}
  if has_checkpoints:
    variables, step = checkpointing.restore_inference_variables(workdir, abstract)
    weights['raw'] = variables
    try:
      weights['ema'], _ = checkpointing.restore_inference_variables(workdir, abstract, step, use_ema=True)
    except checkpointing.CheckpointError:
      pass  # no EMA in this run
    source_name = f'step {step} of {workdir}'
  elif config.init_from:
    fresh = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), abstract)
    weights['raw'], step = transfer.load(config, fresh)
    source_name = f'step {step} of {config.init_from}'
  else:
    raise checkpointing.CheckpointError(
      f'nothing to evaluate: {workdir} has no checkpoints and config.init_from is unset; '
      'train first or pass --config.init_from=WORKDIR'
    )

  eval_step = jax.jit(make_eval_step(model, config.model.num_classes))
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  results = {}
  try:
    with jax.set_mesh(mesh):
      for name, variables in weights.items():
        variables = jax.device_put(variables, sharding.replicated(mesh))
        results[name] = evaluate(
          eval_step, variables, source, config.eval.batch_size, mesh, **eval_options(config)
        )
        writer.write(step, 'eval', {**results[name], 'weights': name})
        if jax.process_index() == 0:
          print(json.dumps({'step': step, 'weights': name, **results[name]}), flush=True)
  finally:
    writer.close()
  logging.info('evaluated %s', source_name)
  return results
