"""mode=linear_eval: ridge regression on frozen pooled features, the penalty chosen on held-out train."""

import json

import numpy as np
from PIL import Image
import pytest
from train_configs import command_line_overrides, run_module, tiny_config

from atlas_jax import linear_eval, train


def test_ridge_separates_separable_features_and_prefers_the_larger_penalty_on_ties():
  rng = np.random.default_rng(0)
  labels = np.arange(60) % 3
  features = rng.normal(size=(60, 8)) + 4.0 * np.eye(3, 8)[labels]  # class means far apart
  weights, bias, l2, scores = linear_eval.choose_and_fit(features, labels, 3, (1e-3, 1.0), 0.25, seed=0)
  assert set(scores) == {1e-3, 1.0} and scores[1e-3] == scores[1.0] == 1.0
  assert l2 == 1.0  # equal holdout top-1: the larger penalty
  assert linear_eval.top1(features, labels, weights, bias) == 1.0


def test_ridge_matches_the_normal_equations_with_an_unpenalised_bias():
  rng = np.random.default_rng(1)
  features, labels = rng.normal(size=(40, 5)), rng.integers(0, 4, 40)
  weights, bias = linear_eval.fit_ridge(features, labels, 4, l2=0.5)
  # From the definition: minimise |[X 1] [W; b] - Y|^2 + 0.5 |W|^2 (the bias row unpenalised).
  design = np.concatenate([features, np.ones((40, 1))], axis=1)
  penalty = np.diag([0.5] * 5 + [0.0])
  expected = np.linalg.solve(design.T @ design + penalty, design.T @ np.eye(4)[labels])
  np.testing.assert_allclose(weights, expected[:5], atol=1e-10)
  np.testing.assert_allclose(bias, expected[5], atol=1e-10)


def test_too_few_train_examples_for_a_holdout_is_one_line():
  with pytest.raises(linear_eval.LinearEvalError, match='hold out'):
    linear_eval.choose_and_fit(np.zeros((1, 2)), np.zeros(1, int), 2, (1.0,), 0.2, seed=0)


def _colour_folder(root):
  """train/ and val/ of two classes told apart by colour alone: reddish and bluish noise."""
  rng = np.random.default_rng(0)
  for split, count in (('train', 12), ('val', 6)):
    for label, channel in (('blue', 2), ('red', 0)):
      (root / split / label).mkdir(parents=True)
      for index in range(count):
        image = rng.integers(0, 120, (40, 40, 3)).astype(np.uint8)
        image[..., channel] = rng.integers(150, 256, (40, 40))
        Image.fromarray(image).save(root / split / label / f'{index}.png')


def test_a_random_backbone_separates_two_colours_through_the_command_line(tmp_path):
  """The weights stay those of initialisation (lr 0, one step); the classifier alone must find the colour."""
  _colour_folder(tmp_path / 'data')
  fields = dict(
    data__source='folder',
    data__data_dir=str(tmp_path / 'data'),
    model__num_classes=2,
    lr=0.0,
    warmup_steps=0,
    eval__every_steps=1,
    data__augment__randaug_num_ops=0,
    data__augment__host_max_side=0,
    mixup__mixup_alpha=0.0,
    mixup__cutmix_alpha=0.0,
    batch_size=4,
    eval__batch_size=4,
  )
  train.run(tiny_config(steps=1, **fields), tmp_path / 'run')
  flags = command_line_overrides(**fields)
  result = run_module(
    'atlas_jax.main',
    '--config=configs/quickstart.py:steps=1',
    f'--workdir={tmp_path / "run"}',
    '--config.mode=linear_eval',
    '--config.linear_eval.holdout_fraction=0.25',
    *flags,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed['linear_top1'] == 1.0 and printed['train_examples'] == 24 and printed['val_examples'] == 12
  records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['linear_top1'] for r in records if r['kind'] == 'linear_eval'] == [1.0]


def test_nothing_to_evaluate_is_one_line(tmp_path):
  result = run_module(
    'atlas_jax.main',
    '--config=configs/quickstart.py',
    f'--workdir={tmp_path}',
    '--config.mode=linear_eval',
    *command_line_overrides(),
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: nothing to evaluate')
