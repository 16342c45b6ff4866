"""The trainer on an image folder with a broken file: the loader gets the train transform (host share at a
smaller size, the step upsamples), the periodic evaluation the eval transform, and the bad files are
skipped, so the run ends and its evaluation counts every good validation image once."""

import json

import numpy as np
from PIL import Image
import pytest

from atlas_jax import train
from atlas_jax.data import sources
from tests.train_configs import tiny_config


def test_a_short_run_on_a_folder_with_a_bad_file(tmp_path):
  rng = np.random.default_rng(0)
  data_dir = tmp_path / 'images'
  for split, count in (('train', 6), ('val', 2)):
    for name in ('n01', 'n02', 'n03'):
      directory = data_dir / split / name
      directory.mkdir(parents=True)
      for index in range(count):  # sizes other than the model's
        Image.fromarray(rng.integers(0, 256, (20 + 3 * index, 44, 3), dtype=np.uint8)).save(
          directory / f'{index}.jpg'
        )
    (data_dir / split / 'n02' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 cut short')
  config = tiny_config(
    steps=2,
    data__source='folder',
    data__data_dir=str(data_dir),
    model__num_classes=3,
    data__max_bad_fraction=0.2,
    eval__every_steps=2,
    eval__batch_size=4,
    checkpoint__every_steps=2,
  )
  config.data.augment.host_max_side = 16  # the step upsamples 16 -> 32 px
  state = train.run(config, tmp_path / 'workdir')
  assert int(state.step) == 2
  records = [json.loads(line) for line in (tmp_path / 'workdir' / 'metrics.jsonl').read_text().splitlines()]
  evaluation = [record for record in records if record['kind'] == 'eval']
  assert len(evaluation) == 1 and evaluation[0]['examples'] == 6  # 7 files, the broken one skipped
  assert all(np.isfinite(record['loss']) for record in records)


def test_a_folder_with_fewer_classes_than_the_head_is_refused_before_training(tmp_path):
  for name in ('n01', 'n02'):
    for split in ('train', 'val'):
      (tmp_path / 'images' / split / name).mkdir(parents=True)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'images' / split / name / '0.png')
  config = tiny_config(data__source='folder', data__data_dir=str(tmp_path / 'images'), model__num_classes=5)
  with pytest.raises(sources.DataSourceError, match=r'has 2 classes but model.num_classes is 5: set '):
    train.run(config, tmp_path / 'workdir')
  assert not (tmp_path / 'workdir' / 'config.json').exists()
