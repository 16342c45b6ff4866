"""atlas_jax.config: one resolution of every field, defaults from configs/common.py only, bad fields refused
by name in one line before anything is built."""

import json
import math
import re

import ml_collections
import pytest

from atlas_jax import config as config_lib
from atlas_jax import optim
from atlas_jax import workdir as workdir_lib
from atlas_jax.errors import AtlasError
from atlas_jax.models.layout import LayoutError
from configs import common
from tests.train_configs import ROOT, run_module, tiny_config

NAN, INF = math.nan, math.inf


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
    # Every number finite and in the range its meaning implies.
    (dict(lr=NAN), 'config.lr'),
    (dict(lr=INF), 'config.lr'),
    (dict(min_lr=INF), 'config.min_lr'),
    (dict(weight_decay=NAN), 'config.weight_decay'),
    (dict(device_memory_gib=INF), 'config.device_memory_gib'),
    (dict(model__mlp_ratio=-1), 'config.model.mlp_ratio'),
    (dict(model__window=0), 'config.model.window'),
    (dict(model__pool=1), 'config.model.pool'),
    (dict(model__drop_path_rate=1.5), 'config.model.drop_path_rate'),
    (dict(model__drop_path_rate=1.0), 'config.model.drop_path_rate'),
    (dict(model__drop_path_rate=NAN), 'config.model.drop_path_rate'),
    (dict(optimizer__b1=1.5), 'config.optimizer.b1'),
    (dict(optimizer__b2=1.0), 'config.optimizer.b2'),
    (dict(optimizer__b1=-0.1), 'config.optimizer.b1'),
    (dict(optimizer__eps=-1e-8), 'config.optimizer.eps'),
    (dict(optimizer__eps=0.0), 'config.optimizer.eps'),
    (dict(optimizer__eps=INF), 'config.optimizer.eps'),
    (dict(optimizer__clip_grad_norm=NAN), 'config.optimizer.clip_grad_norm'),
    (dict(optimizer__layer_decay=NAN), 'config.optimizer.layer_decay'),
    (dict(ema__decay=NAN), 'config.ema.decay'),
    (dict(mixup__mixup_alpha=NAN), 'config.mixup.mixup_alpha'),
    (dict(mixup__cutmix_alpha=INF), 'config.mixup.cutmix_alpha'),
    (dict(mixup__label_smoothing=NAN), 'config.mixup.label_smoothing'),
    (dict(mesh__data=0), 'config.mesh.data'),
    (dict(mesh__fsdp=-2), 'config.mesh.fsdp'),
    (dict(checkpoint__keep=0), 'config.checkpoint.keep'),
    (dict(profile__start_step=-2), 'config.profile.start_step'),
    (dict(profile__num_steps=0), 'config.profile.num_steps'),
    (dict(linear_eval__l2_grid=(1.0, INF)), 'config.linear_eval.l2_grid'),
    (dict(data__crop_pct=NAN), 'config.data.crop_pct'),
    (dict(data__augment__crop_scale=(NAN, 1.0)), 'config.data.augment.crop_scale'),
    (dict(data__augment__erase_ratio=(0.3, INF)), 'config.data.augment.erase_ratio'),
    (dict(data__augment__randaug_magnitude=11.0), 'config.data.augment.randaug_magnitude'),
    (dict(data__augment__randaug_magnitude_std=INF), 'config.data.augment.randaug_magnitude_std'),
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


@pytest.mark.parametrize(
  'field, value',
  [
    ('lr', '0.001'),
    ('model.mlp_ratio', 4.5),
    ('model.window', '4'),
    ('model.depths', 2),
    ('checkpoint.async_save', 'yes'),
    ('data.augment.erase_area', 0.5),
    ('data.augment.crop_scale', [0.5, 'x']),
    ('model.name', 3),
    ('optimizer', 0.9),
  ],
)
def test_a_hand_edited_config_json_of_the_wrong_type_is_refused_by_name(tmp_path, field, value):
  """predict and eval read config.json back: a wrong type is one ConfigError line, not a TypeError later."""
  path = workdir_lib.write_config(tmp_path, config_lib.resolve(tiny_config()))
  values = json.loads(path.read_text())
  *groups, leaf = field.split('.')
  node = values
  for group in groups:
    node = node[group]
  node[leaf] = value
  path.write_text(json.dumps(values))
  with pytest.raises(config_lib.ConfigError, match=re.escape(f'config.{field} ')) as error:
    config_lib.resolve(workdir_lib.read_config(tmp_path))
  assert '\n' not in str(error.value)


def test_checkpoint_keep_none_keeps_every_checkpoint():
  assert config_lib.resolve(_with(tiny_config(), checkpoint__keep=None)).checkpoint.keep is None


QUICKSTART = '--config=configs/quickstart.py'


@pytest.mark.parametrize(
  'args, message',
  [
    ([QUICKSTART, '--config.model.mlp_rato=2'], 'did you mean --config.model.mlp_ratio?'),
    ([QUICKSTART, '--config.mlp_ratio=2'], 'did you mean --config.model.mlp_ratio?'),
    ([QUICKSTART, '--noconfig.checkpoint.asyncsave'], 'did you mean --config.checkpoint.async_save?'),
    ([QUICKSTART, '--config.zzzzzz=1'], 'configs/common.py lists every field'),
    (['--config=configs/quikstart.py'], 'does not exist; did you mean --config=configs/quickstart.py?'),
    (['--config', 'configs/nothing_like_it.py'], 'does not exist'),
    (['--config=configs/quickstart.py:bogus=1'], "unknown config argument 'bogus'; known: model, steps"),
    (['--config=configs/quickstart.py:steps=many'], 'bad config argument'),
    (
      [QUICKSTART, '--config.model.depths=1', '--config.model.depths=2'],
      '--config.model.depths is given twice',
    ),
    (['--config.lr=1', QUICKSTART], '--config.lr comes before --config='),
  ],
)
def test_a_command_line_config_mistake_is_one_line(args, message):
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)) as error:
    config_lib.check_command_line(args)
  assert '\n' not in str(error.value)


def test_a_good_command_line_passes_the_check():
  config_lib.check_command_line([QUICKSTART + ':steps=3', '--config.model.depths=(1,1)', '--config.lr=0.1'])
  config_lib.check_command_line(['--workdir=/tmp/x'])  # no --config: absl's own message


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--config.model.mlp_rato=2'], 'error: --config.model.mlp_rato: configs/quickstart.py has no field'),
    (['--config.lr=nan'], 'error: config.lr must be a finite number >= 0, got nan'),
  ],
)
def test_the_command_line_says_a_config_mistake_in_one_line_before_any_workdir(tmp_path, flags, message):
  """Through `python -m atlas_jax.main`: the flag-parsing hook and resolve, exit code 1, nothing written."""
  workdir = tmp_path / 'run'
  result = run_module('atlas_jax.main', QUICKSTART, f'--workdir={workdir}', *flags)
  assert result.returncode == 1, result.stderr
  assert result.stderr.startswith(message) and result.stderr.count('\n') == 1, result.stderr
  assert not workdir.exists() and ROOT.is_dir()
