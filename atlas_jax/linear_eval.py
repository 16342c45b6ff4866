"""`--config.mode=linear_eval`: a closed-form linear classifier on frozen features, top-1 on validation.

The features are the pooled vector the head reads (the readout's normalised mean over tokens,
`model.pre_logits`), of the eval transform of every train and validation example, from the workdir's best
(else latest) checkpoint or `init_from` (raw weights, and EMA weights when present). The classifier is
ridge regression on one-hot targets with an unpenalised bias, solved in float64: the penalty is chosen from
`linear_eval.l2_grid` by top-1 on a held-out `linear_eval.holdout_fraction` of the train features (a
permutation seeded by `config.seed`; ties go to the larger penalty), then refitted on all of them. Results
are printed and appended to WORKDIR/metrics.jsonl as kind `linear_eval`.
"""

import json

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from atlas_jax import config as config_lib
from atlas_jax import evaluate, run_setup, sharding, transfer
from atlas_jax import metrics as metrics_lib
from atlas_jax.errors import AtlasError
from atlas_jax.models import build_model


class LinearEvalError(AtlasError, ValueError):
  """A split too small to hold out examples from, or to fit a classifier on."""


class Subset:
  """The examples `indices` of a source, in that order (the cap of `linear_eval.max_train_examples`)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices)
    self.num_classes = source.num_classes

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[int(self.indices[index])]


def extract_features(model, variables, source, config, mesh) -> tuple[np.ndarray, np.ndarray]:
  """(features (N, dim) float32, labels (N,) int) of every example of `source` that decodes, in order."""
  from atlas_jax.data import pipeline

  pooled = jax.jit(
    lambda variables, images, sizes: model.apply(variables, images, sizes=sizes, method=model.pre_logits)
  )
  features, labels = [], []
  options = evaluate.eval_options(config)
  with pipeline.EvalLoader(
    source,
    config.eval.batch_size,
    # Processes of one spatial group load the same examples, each keeping its own rows.
    process_index=sharding.process_batch_slot(mesh)[0],
    process_count=sharding.process_batch_slot(mesh)[1],
    workers=options['workers'],
    transform=options['transform'],
    max_bad_fraction=options['max_bad_fraction'],
    canvas_multiple=options['canvas_multiple'],
  ) as loader:
    for local_batch in loader:
      batch = sharding.global_batch(local_batch, mesh)
      # data.resize='none': each batch is its own canvas and 'size' says where each image ends.
      vectors = pooled(variables, batch['image'], batch['size'] if 'size' in batch else None)
      # Every process needs every example's vector: the fit is done on each, identically.
      vectors, batch_labels, mask = (
        np.asarray(multihost_utils.process_allgather(value, tiled=True))
        for value in (vectors, batch['label'], batch['mask'])
      )
      features.append(vectors[mask])
      labels.append(batch_labels[mask])
  return np.concatenate(features).astype(np.float32), np.concatenate(labels).astype(np.int64)


def fit_ridge(features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float):
  """(weights (dim, classes), bias (classes,)) minimising |X W + b - Y|^2 + l2 |W|^2, Y one-hot, float64."""
  x = features.astype(np.float64)
  mean = x.mean(axis=0)
  centred = x - mean
  targets = np.eye(num_classes)[labels]
  target_mean = targets.mean(axis=0)
  gram = centred.T @ centred + l2 * np.eye(x.shape[1])
  weights = np.linalg.solve(gram, centred.T @ (targets - target_mean))
  return weights, target_mean - mean @ weights


def top1(features: np.ndarray, labels: np.ndarray, weights, bias) -> float:
  return float(np.mean(np.argmax(features.astype(np.float64) @ weights + bias, axis=1) == labels))


def choose_and_fit(
  train_features, train_labels, num_classes: int, l2_grid, holdout_fraction: float, seed: int
):
  """The penalty of `l2_grid` best on a held-out part of train, refitted on all of train.

  Returns (weights, bias, l2, {l2: holdout top-1})."""
  count = len(train_labels)
  held = int(round(count * holdout_fraction))
  if held < 1 or count - held < 1:
    raise LinearEvalError(
      f'linear_eval needs train examples both to fit and to hold out: {count} decoded with '
      f'holdout_fraction={holdout_fraction}; use a larger train split or another holdout_fraction'
    )
  order = np.random.default_rng(seed).permutation(count)
  holdout, fit = order[:held], order[held:]
  scores = {}
  for l2 in sorted(float(value) for value in l2_grid):
    weights, bias = fit_ridge(train_features[fit], train_labels[fit], num_classes, l2)
    scores[l2] = top1(train_features[holdout], train_labels[holdout], weights, bias)
  best = max(scores, key=lambda l2: (scores[l2], l2))  # ties: the larger penalty, the simpler model
  weights, bias = fit_ridge(train_features, train_labels, num_classes, best)
  return weights, bias, best, scores


def run(config, workdir, force_unlock: bool = False) -> dict:
  """Linear evaluation of the workdir's (or init_from's) weights; {'raw': result[, 'ema': result]}. Holds
  WORKDIR/lock meanwhile, as mode=eval does."""
  from atlas_jax.data import sources

  config = config_lib.resolve(config)
  evaluate.check_eval_resize(config)  # data.resize='none' evaluates on one process only
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(config.eval.batch_size, mesh, 'config.eval.batch_size')
  num_classes = config.model.num_classes
  splits = {
    split: sources.make_source(config.data, config.image_size, split, config.seed, num_classes=num_classes)
    for split in ('train', 'validation')
  }
  cap = config.linear_eval.max_train_examples
  if cap and cap < len(splits['train']):
    chosen = np.random.default_rng(config.seed).permutation(len(splits['train']))[:cap]
    splits['train'] = Subset(splits['train'], np.sort(chosen))
  model = build_model(config, dtype=run_setup.compute_dtype(config))
  abstract = run_setup.abstract_variables(model, config.image_size)
  lock = run_setup.take_workdir_lock(config, workdir, 'linear evaluation', force_unlock)
  writer = None
  results = {}
  try:
    weights, step, where = transfer.weights_to_evaluate(config, workdir, abstract)
    writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
    for name, variables in evaluate.each_replicated(weights, mesh):
      train_features, train_labels = extract_features(model, variables, splits['train'], config, mesh)
      val_features, val_labels = extract_features(model, variables, splits['validation'], config, mesh)
      classifier, bias, l2, scores = choose_and_fit(
        train_features,
        train_labels,
        num_classes,
        config.linear_eval.l2_grid,
        config.linear_eval.holdout_fraction,
        config.seed,
      )
      results[name] = {
        'linear_top1': top1(val_features, val_labels, classifier, bias),
        'l2': l2,
        'holdout_top1': scores[l2],
        'train_examples': len(train_labels),
        'val_examples': len(val_labels),
        'weights': name,
      }
      writer.write(step, 'linear_eval', results[name])
      if jax.process_index() == 0:
        print(json.dumps({'step': step, **results[name]}), flush=True)
  finally:
    if writer is not None:
      writer.close()
    lock.release()
  logging.info('linear evaluation of %s', where)
  return results
