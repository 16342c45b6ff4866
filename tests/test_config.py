"""atlas_jax.config: one resolution of every field, defaults from configs/common.py only, bad fields refused
by name in one line before anything is built."""

import ml_collections
import pytest

from atlas_jax import config as config_lib
from atlas_jax import optim
from atlas_jax import workdir as workdir_lib
from atlas_jax.errors import AtlasError
from atlas_jax.models.layout import LayoutError
from configs import common
from tests.train_configs import tiny_config


def _with(config, **fields):
  """`config` with dotted fields ('__' for '.') set."""
  config.update_from_flattened_dict({name.replace('__', '.'): value for name, value in fields.items()})
  return config


@pytest.mark.parametrize(
  'overrides, field',
  [
    (dict(lr=-1e-3), 'config.lr'),
    (dict(min_lr=-1.0), 'config.min_lr'),
    (dict(warmup_steps=200, total_steps=100), 'config.warmup_steps'),
    (dict(total_steps=0), 'config.total_steps'),
    (dict(grad_accum_steps=0), 'config.grad_accum_steps'),
    (dict(optimizer__clip_grad_norm=-1.0), 'config.optimizer.clip_grad_norm'),
    (dict(ema__decay=1.0), 'config.ema.decay'),
    (dict(weight_decay=-0.1), 'config.weight_decay'),
    (dict(mode='fit'), 'config.mode'),
    (dict(batch_size=0), 'config.batch_size'),
    (dict(log__every_steps=0), 'config.log.every_steps'),
    (dict(eval__every_steps=0), 'config.eval.every_steps'),
    (dict(checkpoint__every_steps=0), 'config.checkpoint.every_steps'),
    (dict(eval__batch_size=-2), 'config.eval.batch_size'),
    (dict(batch_size=8, grad_accum_steps=3), 'config.grad_accum_steps=3'),
    (dict(model__name='resnet'), 'config.model.name'),
    (dict(model__variant='L'), 'config.model.variant'),
    (dict(model__dtype='int8'), 'config.model.dtype'),
    (dict(model__num_heads=3), 'model.num_heads 3'),
    (dict(model__mlp_ratio=0), 'config.model.mlp_ratio'),
    (dict(model__remat='everything'), 'config.model.remat'),
    (dict(model__communication='sideways'), 'config.model.communication'),
    (dict(data__source='s3'), 'config.data.source'),
    # The augmentation (checked before any loader is built, the synthetic task included).
    (dict(data__augment__hflip=1.5), 'config.data.augment.hflip'),
    (dict(data__augment__crop_scale=(0.5, 0.1)), 'config.data.augment.crop_scale'),
    (dict(data__augment__randaug_prob=-0.1), 'config.data.augment.randaug_prob'),
    (dict(data__augment__host_max_side=-1), 'config.data.augment.host_max_side'),
    (dict(data__augment__erase_mode='noise'), 'config.data.augment.erase_mode'),
    (dict(data__augment__erase_prob=2.0), 'config.data.augment.erase_prob'),
    (dict(data__augment__erase_area=(0.0, 0.5)), 'config.data.augment.erase_area'),
    (dict(data__augment__erase_count=0), 'config.data.augment.erase_count'),
  ],
)
def test_a_field_out_of_range_is_refused_by_name_in_one_line(overrides, field):
  with pytest.raises(config_lib.ConfigError, match=field.replace('.', r'\.')) as error:
    config_lib.resolve(_with(tiny_config(), **overrides))
  assert '\n' not in str(error.value)
  assert isinstance(error.value, AtlasError) and isinstance(error.value, ValueError)


def test_an_unwindowable_size_is_refused_at_resolution():
  with pytest.raises(LayoutError, match='nearest sizes that work'):
    config_lib.resolve(common.base_config('S', 1000))


def test_image_size_is_normalised_once():
  for given in (2048, (2048,), (2048, 2048)):
    assert config_lib.image_size(given) == (2048, 2048)
  assert config_lib.image_size((1024, 2048)) == (1024, 2048)
  for bad in ((0, 10), (1, 2, 3), 'big', (10.5, 10), True):
    with pytest.raises(config_lib.ConfigError, match='image_size'):
      config_lib.image_size(bad)


def test_derived_fields_are_resolved_and_explicit_ones_win():
  resolved = config_lib.resolve(common.base_config('B', 2048))
  assert (resolved.model.dim, resolved.model.num_heads, resolved.model.stem_width) == (768, 12, 192)
  assert resolved.model.depths == (2, 2, 8) and resolved.image_size == (2048, 2048)
  assert resolved.eval.batch_size == 2048 // 8  # 0 = the training micro-batch
  explicit = _with(common.base_config('B', 2048), model__dim=96, model__depths=(1, 1, 1), eval__batch_size=4)
  explicit = config_lib.resolve(explicit)
  assert (explicit.model.dim, explicit.model.depths, explicit.eval.batch_size) == (96, (1, 1, 1), 4)


def test_resolving_twice_gives_the_same_config_and_leaves_the_input_alone():
  config = tiny_config()
  once = config_lib.resolve(config)
  assert config_lib.resolve(once).to_dict() == once.to_dict()
  assert config.model.num_heads == 2 and config.model.stem_width is None  # the input is not changed


def test_defaults_come_from_configs_common_only():
  """A config that lacks fields or whole groups gets them from configs/common.py, placeholders typed."""
  config = common.base_config('S', 1024)
  del config['ema']
  del config.data['source']
  del config.data['augment']
  resolved = config_lib.resolve(config)
  assert resolved.ema.decay == 0.0 and not optim.ema_enabled(resolved)
  assert resolved.data.source == common.data_config().source == 'tfds'
  assert resolved.data.augment.to_dict() == common.augment_config().to_dict()
  resolved.init_from = '/a/workdir'  # still a typed placeholder, overridable
  with pytest.raises(TypeError):
    resolved.init_from = 3


def test_none_turns_ema_and_clipping_off():
  resolved = config_lib.resolve(_with(tiny_config(), ema__decay=None, optimizer__clip_grad_norm=None))
  assert resolved.ema.decay == 0.0 and resolved.optimizer.clip_grad_norm == 0.0
  assert not optim.ema_enabled(resolved)


def test_a_resolved_config_round_trips_through_config_json(tmp_path):
  resolved = config_lib.resolve(tiny_config())
  workdir_lib.write_config(tmp_path, resolved)
  assert config_lib.resolve(workdir_lib.read_config(tmp_path)).to_dict() == resolved.to_dict()


def test_get_reads_dotted_names():
  config = ml_collections.ConfigDict({'a': {'b': 3}})
  assert config_lib.get(config, 'a.b') == 3 and config_lib.get(config, 'a.c') is None
  assert config_lib.get(config, 'x.y') is None
