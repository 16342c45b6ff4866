"""Per-class reports of an evaluation: WORKDIR/eval/<step>[_ema]_per_class.csv and _confusion.png."""

import csv
import json
import shutil

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from atlas_jax import eval_report, evaluate, inference, train
from atlas_jax import metrics as metrics_lib
from tests.train_configs import tiny_config

NUM_CLASSES = 8  # the synthetic task's 4 classes and 4 the split never has: top-5 and empty rows both show


def _read_csv(path) -> list[dict]:
  with open(path, newline='', encoding='utf-8') as file:
    return list(csv.DictReader(file))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny run of 2 steps with EMA, evaluated after each: 12 validation examples in batches of 8."""
  workdir = tmp_path_factory.mktemp('run')
  config = tiny_config(steps=2, model__num_classes=NUM_CLASSES, ema__decay=0.9, eval__every_steps=1)
  train.run(config, workdir)
  return config, workdir


def test_training_writes_reports_that_add_up_to_the_logged_top1(trained):
  _, workdir = trained
  evals = [record for record in metrics_lib.read_metrics(workdir) if record['kind'] == 'eval']
  assert [(record['step'], record['weights']) for record in evals] == [
    (1, 'raw'),
    (1, 'ema'),
    (2, 'raw'),
    (2, 'ema'),
  ]
  assert all(
    set(record) == {'step', 'kind', 'weights', 'top1', 'top5', 'loss', 'examples'} for record in evals
  )
  names = list(inference.SYNTHETIC_CLASS_NAMES) + ['4', '5', '6', '7']
  for record in evals:
    csv_path, png_path = eval_report.report_paths(workdir, record['step'], record['weights'])
    assert csv_path.name == (
      '{}_per_class.csv' if record['weights'] == 'raw' else '{}_ema_per_class.csv'
    ).format(record['step'])
    rows = _read_csv(csv_path)
    assert [row['class'] for row in rows] == [str(index) for index in range(NUM_CLASSES)]
    assert [row['name'] for row in rows] == names
    counts = [int(row['count']) for row in rows]
    assert sum(counts) == record['examples'] == 12  # the 4 padding examples of the last batch left out
    assert counts[4:] == [0] * 4 and all(row['top1'] == row['top5'] == '' for row in rows[4:])
    correct = sum(round(float(row['top1']) * int(row['count'])) for row in rows if row['count'] != '0')
    assert correct / sum(counts) == pytest.approx(record['top1'], abs=1e-9)
    hits = sum(round(float(row['top5']) * int(row['count'])) for row in rows if row['count'] != '0')
    assert hits / sum(counts) == pytest.approx(record['top5'], abs=1e-9)
    with Image.open(png_path) as image:
      side = eval_report.label_margin(names) + NUM_CLASSES * eval_report.cell_size(NUM_CLASSES)
      assert image.size == (side, side) == (6 * max(map(len, names)) + 8 + 8 * 24,) * 2


def test_eval_mode_writes_the_reports_of_the_step_it_evaluates(trained, tmp_path):
  config, workdir = trained
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / eval_report.EVAL_DIR)
  results = evaluate.run(config, copy)
  assert set(results) == {'raw', 'ema'} and set(results['raw']) == {'top1', 'top5', 'loss', 'examples'}
  # The step mode=eval evaluated (the best recorded one): its records are the file's last lines.
  step = json.loads((copy / 'metrics.jsonl').read_text().splitlines()[-1])['step']
  for weights, result in results.items():
    csv_path, png_path = eval_report.report_paths(copy, step, weights)
    rows = _read_csv(csv_path)
    correct = sum(round(float(row['top1']) * int(row['count'])) for row in rows if row['count'] != '0')
    assert correct / result['examples'] == pytest.approx(result['top1'], abs=1e-9)
    with Image.open(png_path) as image:
      assert image.format == 'PNG' and image.size[0] == image.size[1]
  assert sorted(path.name for path in (copy / eval_report.EVAL_DIR).iterdir()) == sorted(
    [
      f'{step}_per_class.csv',
      f'{step}_confusion.png',
      f'{step}_ema_per_class.csv',
      f'{step}_ema_confusion.png',
    ]
  )


def test_the_eval_step_counts_real_examples_by_true_class_and_top1_prediction():
  logits = np.full((5, 6), -1.0, np.float32)
  predicted = [2, 2, 0, 5, 1]
  logits[np.arange(5), predicted] = 1.0
  logits[0, 4] = 0.5  # example 0 (class 4): right at top 5, not at top 1
  logits[3, 0] = -2.0  # example 3 (class 0): last, so wrong at top 5 too

  class FixedLogits:
    def apply(self, variables, images, train):
      return jnp.asarray(logits)

  labels = np.array([4, 2, 0, 0, 0])
  mask = np.array([True, True, True, True, False])  # the last is padding (or undecodable): label 0, left out
  sums = evaluate.make_eval_step(FixedLogits(), 6)(
    {}, {'image': np.zeros((5, 1, 1, 3)), 'label': labels, 'mask': mask}
  )
  want = np.zeros((6, 6), np.int64)
  for label, prediction in zip(labels[:4], predicted[:4]):
    want[label, prediction] += 1
  np.testing.assert_array_equal(sums['confusion'], want)
  assert sums['confusion'].dtype == jnp.int32
  np.testing.assert_array_equal(sums['top5_hits'], [1, 0, 1, 0, 1, 0])
  assert float(sums['top1']) == np.trace(want) == 2


def test_per_class_csv_of_a_hand_made_matrix(tmp_path):
  confusion = np.array(
    [[3, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [2, 0, 2, 0, 0, 0]] + [[0] * 6] * 2 + [[0, 0, 0, 0, 0, 7]]
  )
  top5_hits = np.array([4, 0, 3, 0, 0, 7])
  names = ['cat', 'dog, big', 'fox', 'hen', 'owl', 'yak']
  path = tmp_path / 'eval' / '3_per_class.csv'
  eval_report.write_per_class_csv(path, confusion, top5_hits, names)
  assert path.read_text().splitlines()[:3] == [
    'class,name,count,top1,top5',
    '0,cat,4,0.7500,1.0000',
    '1,"dog, big",0,,',
  ]
  rows = _read_csv(path)
  assert [(row['name'], row['count'], row['top1'], row['top5']) for row in rows] == [
    ('cat', '4', '0.7500', '1.0000'),
    ('dog, big', '0', '', ''),
    ('fox', '4', '0.5000', '0.7500'),
    ('hen', '0', '', ''),
    ('owl', '0', '', ''),
    ('yak', '7', '1.0000', '1.0000'),
  ]
  assert [path.name for path in path.parent.iterdir()] == ['3_per_class.csv']  # no temp file left behind
  # With 5 classes or fewer top-5 is always right: left empty.
  eval_report.write_per_class_csv(path, confusion[:5, :5], top5_hits[:5], names[:5])
  assert [row['top5'] for row in _read_csv(path)] == [''] * 5
  with pytest.raises(ValueError, match='3 class names'):
    eval_report.write_per_class_csv(path, confusion, top5_hits, names[:3])


@pytest.mark.parametrize('num_classes', [3, 64, 200, 1000])
def test_confusion_png_size_follows_the_formula(tmp_path, num_classes):
  names = [f'class {index}' for index in range(num_classes)]
  names[0] = 'a much longer class name than the rest, cut to fit'
  confusion = np.eye(num_classes, dtype=np.int64) * 5
  confusion[0] = 0  # a class without examples
  path = tmp_path / 'confusion.png'
  eval_report.write_confusion_png(path, confusion, names)
  cell = max(2, min(24, 1536 // num_classes))
  margin = 6 * min(40, len(names[0])) + 8 if cell >= 10 else 4
  with Image.open(path) as image:
    assert image.format == 'PNG' and image.size == (margin + num_classes * cell,) * 2
    pixels = np.asarray(image.convert('RGB'))
  # A full diagonal cell is the darkest shade; an empty row is grey, an empty cell of another row white.
  inside = margin + cell + cell // 2 - 1
  np.testing.assert_array_equal(pixels[inside, inside], eval_report.DARKEST)
  np.testing.assert_array_equal(pixels[margin, margin], eval_report.EMPTY_ROW)
  np.testing.assert_array_equal(pixels[inside, margin], eval_report.BACKGROUND)
