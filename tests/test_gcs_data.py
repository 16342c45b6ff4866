"""Data, profiles and the compilation cache on gs://, through the command line against a real Cloud Storage
server (tests/gcs_server.py).

An image folder with its class list, and a tiny tfds dataset (ArrayRecord), are uploaded to the bucket and
trained with `--config.data.data_dir=gs://...`: every logged loss and evaluation equals the run on the same
files read locally. All four runs compile through one compilation cache in the bucket, which the first run
fills and the next one reads (a logged cache hit); the folder run on gs:// also traces a profile, which lands
under WORKDIR/profile/ in the bucket as TensorBoard lays it out. In-process tests check the two sources on
gs:// example by example against their local twins, the tfds download cache, and the one-line errors.
"""

import re

import numpy as np
from PIL import Image
import pytest

from atlas_jax import metrics as metrics_lib
from atlas_jax import storage
from atlas_jax.data import sources
from atlas_jax.data.decode import BadImageError
from tests.data import tiny_tfds
from tests.train_configs import command_line_overrides, run_module

CLASSES = ('n01', 'n02', 'n03')
RUN = dict(
  model__num_classes=3,
  data__max_bad_fraction=0.5,  # the folder's broken file; the tfds train split's truncated JPEG
  eval__every_steps=2,
  eval__batch_size=4,
  checkpoint__every_steps=2,
  log__every_steps=1,
)


def _image_folder(root):
  rng = np.random.default_rng(0)
  for split, count in (('train', 4), ('val', 2)):
    for name in CLASSES:
      directory = root / split / name
      directory.mkdir(parents=True)
      for index in range(count):  # sizes other than the model's
        Image.fromarray(rng.integers(0, 256, (20 + 3 * index, 44, 3), dtype=np.uint8)).save(
          directory / f'{index}.jpg'
        )
    (root / split / 'n02' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 cut short')
    (root / split / 'n01' / '.hidden.jpg').write_bytes(b'not listed')
  (root / 'train' / 'n04').mkdir()  # a class the class list leaves out
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / 'train' / 'n04' / '0.png')
  (root / 'classes.txt').write_text('\n'.join(CLASSES) + '\n')
  return root


def _train(workdir, steps=2, env=None, **overrides):
  result = run_module(
    'atlas_jax.main',
    f'--config=configs/quickstart.py:steps={steps}',
    f'--workdir={workdir}',
    *command_line_overrides(**{**RUN, **overrides}),
    env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _records(workdir):
  return [
    {key: value for key, value in record.items() if key not in ('step_time_s', 'images_per_s')}
    for record in metrics_lib.read_metrics(workdir)
  ]


def test_a_folder_and_a_tfds_dataset_on_gcs_train_as_their_local_copies_with_profile_and_cache_on_gcs(
  gcs_dir, tmp_path
):
  folder = _image_folder(tmp_path / 'images')
  tfds_dir = tmp_path / 'tensorflow_datasets'
  tiny_tfds.prepare(tfds_dir, 'array_record')
  storage.upload_tree(folder, f'{gcs_dir}/images')
  storage.upload_tree(tfds_dir, f'{gcs_dir}/tensorflow_datasets')
  # Every run compiles through one cache in the bucket: the first run (local data) fills it, the others
  # (the same programs) read it. JAX_LOG_COMPILES makes JAX log each cache hit as a warning.
  cache = dict(compilation_cache_dir=f'{gcs_dir}/xla')
  env = {'JAX_LOG_COMPILES': '1'}

  folder_run = dict(data__source='folder', **cache)
  _train(tmp_path / 'folder', data__data_dir=folder, data__classes=folder / 'classes.txt', **folder_run)
  entries = [name for name in storage.list_tree(cache['compilation_cache_dir']) if name.endswith('-cache')]
  assert any(name.startswith('jit_train_step') for name in entries), entries
  remote = _train(
    f'{gcs_dir}/folder',
    data__data_dir=f'{gcs_dir}/images',
    data__classes=f'{gcs_dir}/images/classes.txt',
    profile__start_step=1,
    profile__num_steps=1,
    env=env,
    **folder_run,
  )
  assert "Persistent compilation cache hit for 'jit_train_step'" in remote.stderr, remote.stderr[-3000:]
  want = _records(tmp_path / 'folder')
  assert [record['kind'] for record in want] == ['train', 'train', 'eval']
  assert want[-1]['examples'] == 6  # the validation images, the broken one skipped
  assert _records(f'{gcs_dir}/folder') == want
  assert 'skipping bad example' in remote.stderr
  # The trace, uploaded into WORKDIR/profile as TensorBoard's profile plugin reads it.
  traced = storage.list_tree(f'{gcs_dir}/folder/profile')
  assert any(re.fullmatch(r'plugins/profile/[^/]+/[^/]+\.xplane\.pb', name) for name in traced), traced

  tfds_run = dict(data__source='tfds', data__name=tiny_tfds.NAME, **cache)
  _train(tmp_path / 'tfds', data__data_dir=tfds_dir, **tfds_run)
  downloads = tmp_path / 'gcs_cache'
  _train(
    f'{gcs_dir}/tfds',
    data__data_dir=f'{gcs_dir}/tensorflow_datasets',
    env={storage.CACHE_ENV: str(downloads)},
    **tfds_run,
  )
  want = _records(tmp_path / 'tfds')
  assert want[-1]['kind'] == 'eval' and want[-1]['examples'] == tiny_tfds.SPLIT_SIZES['validation']
  assert _records(f'{gcs_dir}/tfds') == want
  # The dataset's small files and the shards of both splits, downloaded into the local cache.
  prepared = downloads / 'objects' / 'test-bucket' / gcs_dir.split('/', 3)[3] / 'tensorflow_datasets'
  cached = sorted(path.name for path in (prepared / tiny_tfds.NAME / '1.0.0').iterdir())
  assert cached == sorted(path.name for path in (tfds_dir / tiny_tfds.NAME / '1.0.0').iterdir())


# In-process, without training: the sources built on gs:// give the local sources' examples, and what is
# missing there is one line naming the gs:// object.

MAX = dict(max_pixels=1 << 20, max_decode_bytes=1 << 30)


def _examples(source, indices):
  return [(source[index]['image'].tobytes(), int(source[index]['label'])) for index in indices]


def test_an_image_folder_on_gcs_lists_and_decodes_as_the_local_folder(gcs_dir, tmp_path):
  folder = _image_folder(tmp_path / 'images')
  storage.upload_tree(folder, f'{gcs_dir}/images')
  for split in ('train', 'validation'):
    for classes in (None, 'classes.txt'):
      local = sources.ImageFolder(folder, split, classes and folder / classes, **MAX)
      remote = sources.ImageFolder(
        f'{gcs_dir}/images', split, classes and f'{gcs_dir}/images/{classes}', **MAX
      )
      assert remote.classes == local.classes and remote.labels.tolist() == local.labels.tolist()
      assert [str(remote.path(i))[len(gcs_dir) :] for i in range(len(remote))] == [
        str(local.path(i))[len(str(tmp_path)) :] for i in range(len(local))
      ]
      good = [i for i in range(len(local)) if local.path(i).name != 'broken.jpg']
      assert _examples(remote, good) == _examples(local, good)
  broken = next(i for i in range(len(remote)) if remote.path(i).name == 'broken.jpg')
  with pytest.raises(BadImageError, match=f'^{gcs_dir}/images/val/n02/broken.jpg: '):
    remote[broken]
  with pytest.raises(sources.DataSourceError, match='is not a directory'):
    sources.ImageFolder(f'{gcs_dir}/nothing', 'train', **MAX)


def test_a_tfds_dataset_on_gcs_is_downloaded_once_per_shard_and_reads_as_the_local_one(
  gcs_dir, tmp_path, monkeypatch
):
  tfds_dir = tmp_path / 'tensorflow_datasets'
  tiny_tfds.prepare(tfds_dir, 'array_record')
  storage.upload_tree(tfds_dir, f'{gcs_dir}/tfds')
  downloads = tmp_path / 'gcs_cache'
  monkeypatch.setenv(storage.CACHE_ENV, str(downloads))
  build = lambda data_dir, split='train': sources.TfdsSource(tiny_tfds.NAME, data_dir, split, **MAX)

  local, remote = build(tfds_dir), build(f'{gcs_dir}/tfds')
  assert remote.classes == local.classes and remote.name == local.name
  bad = f'_train_{tiny_tfds.BAD_TRAIN_RECORD}.png'  # tfds stores the records shuffled
  good = [i for i in range(len(local)) if not local.encoded(i)['file_name'].endswith(bad)]
  assert len(good) == len(local) - 1
  assert _examples(remote, good) == _examples(local, good)
  shards = sorted((downloads / 'objects').rglob('*-train.array_record-*'))
  assert shards and not list((downloads / 'objects').rglob('*-validation.array_record-*'))  # this split's
  modified = {shard: shard.stat().st_mtime_ns for shard in shards}
  build(f'{gcs_dir}/tfds')  # the cache is current: nothing downloaded again
  assert {shard: shard.stat().st_mtime_ns for shard in shards} == modified

  shard = next((tfds_dir / tiny_tfds.NAME / '1.0.0').glob('*-validation.array_record-*'))
  storage.remove(f'{gcs_dir}/tfds/{tiny_tfds.NAME}/1.0.0/{shard.name}')
  with pytest.raises(
    sources.DataSourceError, match=f'^{gcs_dir}/tfds/{tiny_tfds.NAME}/1.0.0/{shard.name} is missing'
  ):
    build(f'{gcs_dir}/tfds', 'validation')
  with pytest.raises(sources.DataSourceError, match='no prepared tfds dataset tiny_classes in'):
    build(f'{gcs_dir}/tfds/{tiny_tfds.NAME}')
