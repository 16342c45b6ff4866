"""Number-for-number parity with the reference PyTorch implementation (tests/fixtures, float32, 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.models import build_model
from atlas_jax.models.reference_names import variables_from_reference
from tests.reference_fixtures import PARITY_FILES, fixture_config, load_fixture, reference_input

TOLERANCE = 1e-4


def _run(name, parent_window=None, train=True):
  """Eval-mode stem, scales of every stage and logits, and train-mode logits, of the fixture's model."""
  meta, state_dict, outputs = load_fixture(name)
  model = build_model(fixture_config(meta, parent_window))
  images = jnp.asarray(reference_input(meta['batch'], meta['resolution']))
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)
  variables = variables_from_reference(state_dict, abstract)

  @jax.jit
  def forward(variables, images):
    def eval_outputs(module, images):
      stem_map, stages = module.encode(images)
      return stem_map, stages, module.classify(stages[-1])

    stem_map, stages, logits = model.apply(variables, images, method=eval_outputs)
    train_logits = model.apply(variables, images, train=True, mutable=['batch_stats'])[0] if train else None
    return stem_map, stages, logits, train_logits

  return outputs, forward(variables, images)


@pytest.mark.parametrize('name', PARITY_FILES)
def test_matches_reference(name):
  outputs, (stem_map, stages, logits, train_logits) = _run(name)
  if 'eval/stem' in outputs:  # NCHW in the fixture
    np.testing.assert_allclose(
      np.asarray(stem_map).transpose(0, 3, 1, 2), outputs['eval/stem'], atol=TOLERANCE
    )
  expected_keys = {key for key in outputs if key.startswith('eval/stage')}
  got_keys = set()
  for stage, scales in enumerate(stages):
    for scale, tokens in enumerate(scales):
      key = f'eval/stage{stage}_scale{scale}'
      got_keys.add(key)
      np.testing.assert_allclose(np.asarray(tokens), outputs[key], atol=TOLERANCE, err_msg=key)
  assert got_keys == expected_keys
  np.testing.assert_allclose(np.asarray(logits), outputs['eval/logits'], atol=TOLERANCE)
  np.testing.assert_allclose(np.asarray(train_logits), outputs['train/logits'], atol=TOLERANCE)


@pytest.mark.parametrize(
  'name, other_rule', [('atlas_tiny_2048_raster', 'spatial'), ('atlas_tiny_2048_spatial', 'raster')]
)
def test_2048_fails_under_the_other_parent_window_rule(name, other_rule):
  outputs, (_, stages, _, _) = _run(name, other_rule, train=False)
  differences = [
    np.abs(np.asarray(tokens) - outputs[f'eval/stage{stage}_scale{scale}']).max()
    for stage, scales in enumerate(stages)
    for scale, tokens in enumerate(scales)
  ]
  assert max(differences) > 1e-3
