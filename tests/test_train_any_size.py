"""Training and evaluation at any image size (issue 17): the step's sizes (finish, Mixup/CutMix, the batch
compile sees), the one-process rule of data.resize='none', and the command line end to end on a folder of
mixed sizes with data.augment.aspect=keep and data.resize=none."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from atlas_jax import augment, evaluate, train
from atlas_jax import config as config_lib
from atlas_jax.data import pipeline, transforms
from tests.data.image_files import folder_config, photo
from tests.train_configs import command_line_overrides, run_module, tiny_config


def test_finish_scales_the_sizes_with_the_canvas_and_leaves_the_images_as_without():
  finish = jax.jit(augment.train_finish(folder_config((32, 48), erase_prob=0.25)))
  images = jax.random.normal(jax.random.key(1), (3, 16, 24, 3))
  sizes = jnp.asarray([[7, 24], [16, 5], [1, 1]], jnp.int32)
  resized, scaled = finish(jax.random.key(2), images, sizes)
  np.testing.assert_array_equal(scaled, [[14, 48], [32, 10], [2, 2]])
  plain, none = finish(jax.random.key(2), images)
  assert none is None
  np.testing.assert_array_equal(resized, plain)
  # No resize (the host made image_size): the sizes pass through.
  _, same = finish(jax.random.key(2), jnp.zeros((3, 32, 48, 3)), sizes)
  np.testing.assert_array_equal(same, sizes)
  np.testing.assert_array_equal(
    augment.resize_sizes(jnp.asarray([[3, 3], [10, 10]]), (10, 10), (4, 4)), [[1, 1], [4, 4]]
  )


@pytest.mark.parametrize('alphas', [(0.8, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_mixup_cutmix_gives_each_pair_the_box_holding_both(alphas):
  images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  labels = jnp.arange(4)
  sizes = jnp.asarray([[8, 3], [2, 8], [5, 5], [1, 7]], jnp.int32)
  options = dict(mixup_alpha=alphas[0], cutmix_alpha=alphas[1])
  mixed, targets = augment.mixup_cutmix(jax.random.key(3), images, labels, 4, **options)
  with_sizes = augment.mixup_cutmix(jax.random.key(3), images, labels, 4, **options, sizes=sizes)
  np.testing.assert_array_equal(with_sizes[0], mixed)
  np.testing.assert_array_equal(with_sizes[1], targets)
  expected = sizes if alphas == (0.0, 0.0) else [[8, 7], [5, 8], [5, 8], [8, 7]]
  np.testing.assert_array_equal(with_sizes[2], expected)


def test_compile_sees_the_loaders_batch_with_sizes():
  config = config_lib.resolve(
    tiny_config(data__source='folder', data__augment__aspect='keep', data__augment__host_max_side=16)
  )
  data = [{'image': photo(40 + 8 * i, 90 - 8 * i, i), 'label': i % 4} for i in range(config.batch_size)]
  with pipeline.TrainLoader(
    data, config.batch_size, seed=0, transform=transforms.train_transform(config), max_bad_fraction=0.0
  ) as loader:
    batch = next(loader)
  expected = train.abstract_batch(config, config.batch_size)
  assert set(expected) == {'image', 'label', 'size'}
  assert {key: (value.shape, value.dtype) for key, value in batch.items()} == {
    key: (value.shape, value.dtype) for key, value in expected.items()
  }
  squash = config_lib.resolve(tiny_config(data__source='folder'))
  assert set(train.abstract_batch(squash, 8)) == {'image', 'label'}


def test_resize_none_is_refused_in_a_multi_process_run(monkeypatch):
  config = config_lib.resolve(tiny_config(data__source='folder', data__resize='none'))
  assert evaluate.canvas_multiple(config) == 16  # patch 4 x window 4
  evaluate.check_eval_resize(config)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(config_lib.ConfigError, match=r"data.resize='none' evaluates in one process only"):
    evaluate.check_eval_resize(config)
  evaluate.check_eval_resize(config_lib.resolve(tiny_config(data__source='folder')))  # squash: any count


def test_the_command_line_trains_and_evaluates_a_folder_of_mixed_sizes(tmp_path):
  """Keep-aspect training with accumulation and Mixup/CutMix, then evaluation of each image at its own size
  (padded canvases of several shapes), through python -m atlas_jax.main."""
  shapes = [(40, 90), (120, 50), (64, 64)]
  for split, count in (('train', 3), ('val', 1)):
    for label, name in enumerate(('n01', 'n02', 'n03')):
      directory = tmp_path / 'images' / split / name
      directory.mkdir(parents=True)
      for index in range(count):
        Image.fromarray(photo(*shapes[(label + index) % 3], 10 * label + index)).save(
          directory / f'{index}.png'
        )
  workdir = tmp_path / 'workdir'
  result = run_module(
    'atlas_jax.main',
    '--config=configs/quickstart.py:steps=2',
    f'--workdir={workdir}',
    *command_line_overrides(
      data__source='folder',
      data__data_dir=str(tmp_path / 'images'),
      data__augment__aspect='keep',
      data__augment__host_max_side=16,
      data__resize='none',
      model__num_classes=3,
      grad_accum_steps=2,
      mixup__mixup_alpha=0.8,
      mixup__cutmix_alpha=1.0,
      eval__every_steps=2,
      eval__batch_size=2,
      checkpoint__every_steps=2,
    ),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_records = [record for record in records if record['kind'] == 'train']
  eval_records = [record for record in records if record['kind'] == 'eval']
  assert train_records and train_records[-1]['step'] == 2
  assert len(eval_records) == 1 and eval_records[0]['examples'] == 3
  assert all(np.isfinite(record['loss']) for record in records)
