"""Labels travel with the model: WORKDIR/labels.txt, written at training start, is what predict and the
Python API name the classes by, so moving the dataset away does not turn the names into indices.
(tests/test_train.py and the trainer's own tests check that train.run writes it.)"""

import jax
import numpy as np
from PIL import Image
import pytest

from atlas_jax import checkpointing, evaluate, inference, run_setup
from atlas_jax import config as config_lib
from atlas_jax import workdir as workdir_lib
from atlas_jax.data import sources
from atlas_jax.models import build_model
from tests.train_configs import run_module, tiny_config

NAMES = ['cat', 'dog', 'fox']


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory):
  """The workdir of a run on a three-class image folder, as training starts it (config.json, labels.txt
  from the train split's source, as train.run writes them) with random weights as step 0, so nothing compiles
  here; the folder is moved away afterwards."""
  root = tmp_path_factory.mktemp('labels')
  rng = np.random.default_rng(0)
  data_dir = root / 'folderds'
  for split in ('train', 'val'):
    for name in NAMES:
      (data_dir / split / name).mkdir(parents=True)
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        data_dir / split / name / '0.png'
      )
  config = config_lib.resolve(
    tiny_config(data__source='folder', data__data_dir=str(data_dir), model__num_classes=3)
  )
  workdir = root / 'workdir'
  workdir_lib.write_config(workdir, config)
  source = sources.make_source(config.data, config.image_size, 'train', config.seed, 3)
  workdir_lib.write_labels(workdir, evaluate.source_class_names(config, source))
  abstract = run_setup.abstract_variables(build_model(config), config.image_size)  # traced, not compiled
  variables = jax.tree.map(lambda leaf: rng.normal(0, 0.1, leaf.shape).astype(leaf.dtype), abstract)
  checkpoints = checkpointing.Checkpoints(workdir)
  checkpoints.save(0, {'params': variables['params'], 'batch_stats': variables.get('batch_stats')})
  checkpoints.close()
  data_dir.rename(root / 'folderds_moved')  # `mv folderds folderds_moved`: config.json still names folderds
  return workdir, root / 'folderds_moved'


def test_the_workdir_holds_the_class_names(folder_run):
  workdir, _ = folder_run
  assert (workdir / 'labels.txt').read_text() == 'cat\ndog\nfox\n'
  assert workdir_lib.read_labels(workdir) == NAMES


def test_predict_names_the_classes_after_the_dataset_moved(folder_run):
  workdir, moved = folder_run
  images = [str(moved / 'val' / name / '0.png') for name in NAMES]
  result = run_module('atlas_jax.predict', f'--checkpoint={workdir}', '--top_k=3', *images)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert [line.split(': ', 1)[0] for line in lines] == images
  for line in lines:  # 'PATH: fox 0.3412, cat 0.3307, dog 0.3281'
    ranked = [entry.rsplit(' ', 1)[0] for entry in line.split(': ', 1)[1].split(', ')]
    assert sorted(ranked) == NAMES, line


def test_the_api_reads_labels_txt_first(folder_run):
  workdir, _ = folder_run
  config = workdir_lib.read_config(workdir)
  assert inference.class_names(config, workdir) == NAMES
  assert inference.class_names(config) == ['0', '1', '2']  # without the workdir: the folder is gone
  predictor = inference.load(workdir)
  assert predictor.class_names == NAMES and predictor.labels == NAMES


def test_labels_txt_of_another_model_is_one_line(tmp_path):
  config = tiny_config(model__num_classes=3)
  workdir_lib.write_labels(tmp_path, ['cat', 'dog'])
  with pytest.raises(inference.InferenceError) as error:
    inference.class_names(config, tmp_path)
  message = str(error.value)
  assert '\n' not in message
  assert message == (
    f'{tmp_path / "labels.txt"} lists 2 class names but the model has 3 classes: it belongs to another '
    'model; fix it (one name a line, in index order) or delete it'
  )


def test_without_labels_txt_the_dataset_still_names_them(tmp_path):
  config = tiny_config(model__num_classes=3)
  (tmp_path / 'classes.txt').write_text('zebra\napple\nmango\n')
  config.data.classes = str(tmp_path / 'classes.txt')
  assert inference.class_names(config, tmp_path / 'no_labels_here') == ['apple', 'mango', 'zebra']
