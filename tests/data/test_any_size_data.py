"""Any image size on the host (issue 17): the train transform's aspect='keep', the eval loader's per-batch
canvas for data.resize='none', and the config fields. numpy and PIL only, no JAX."""

import numpy as np
from PIL import Image
import pytest

from atlas_jax import config as config_lib
from atlas_jax.data import pipeline, transforms
from atlas_jax.data.decode import BadImageError
from atlas_jax.normalization import normalize_image
from tests.data.image_files import folder_config, photo

MAX_BAD_FRACTION = 0.5


def keep_transform(output_size=(32, 32), **fields):
  options = dict(
    output_size=output_size,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    hflip=0.0,
    randaug_num_ops=0,
    randaug_magnitude=9.0,
    randaug_magnitude_std=0.5,
    randaug_magnitude_max=10.0,
    randaug_prob=0.5,
    aspect='keep',
  )
  return transforms.TrainTransform(**{**options, **fields})


def test_keep_fits_the_whole_crop_inside_the_canvas_at_the_top_left():
  image = photo(40, 90)
  # The crop box is the whole image (area 1, its own aspect ratio 90 / 40): the canvas is 32 x 32.
  transform = keep_transform(crop_scale=(1.0, 1.0), crop_ratio=(2.25, 2.25))
  example = transform({'image': image, 'label': 3}, np.random.default_rng(0))
  assert example['label'] == 3 and example['image'].shape == (32, 32, 3)
  assert example['size'].dtype == np.int32 and tuple(example['size']) == (14, 32)  # 40 * 32 / 90 = 14.2
  expected = np.asarray(Image.fromarray(image).resize((32, 14), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(example['image'][:14], expected)
  assert not example['image'][14:].any()


@pytest.mark.parametrize('seed', range(6))
def test_keep_keeps_each_random_crops_aspect_ratio_and_flips_it_in_place(seed):
  image = photo(120, 50, seed)
  transform = keep_transform((24, 40), crop_ratio=(1 / 3, 3.0))
  draw = transform.draw(120, 50, np.random.default_rng(seed))
  height, width = transform.valid_size(draw.box)
  assert height == 24 or width == 40  # one side fills the canvas, the other fits
  assert height <= 24 and width <= 40
  assert abs(height / width - draw.box.height / draw.box.width) <= (draw.box.height / draw.box.width) * (
    1 / min(height, width)
  )
  unflipped = transform.apply(image, draw._replace(flip=False))
  flipped = transform.apply(image, draw._replace(flip=True))
  np.testing.assert_array_equal(flipped[:height, :width], unflipped[:height, :width, :][:, ::-1])
  for canvas in (unflipped, flipped):
    assert not canvas[height:].any() and not canvas[:, width:].any()
  example = transform({'image': image, 'label': 0}, np.random.default_rng(seed))
  assert tuple(example['size']) == (height, width)


def test_randaugment_fills_stay_inside_the_kept_crop():
  image = np.full((40, 90, 3), 200, np.uint8)
  transform = keep_transform(crop_scale=(1.0, 1.0), crop_ratio=(2.25, 2.25))
  draw = transform.draw(40, 90, np.random.default_rng(0))
  rotate = transforms.RandAugmentOp('Rotate', True, 10.0, False)
  result = transform.apply(image, draw._replace(ops=(rotate,)))
  assert (result[:14] == transforms.FILL).all(axis=-1).any()  # the rotation's corners: the mean colour
  assert not result[14:].any()


def test_squash_is_unchanged_and_adds_no_size():
  image = photo(40, 90)
  squash = keep_transform(aspect='squash', hflip=0.5, randaug_num_ops=2)
  example = squash({'image': image, 'label': 0}, np.random.default_rng(1))
  assert 'size' not in example and example['image'].shape == (32, 32, 3)
  draw = squash.draw(40, 90, np.random.default_rng(1))
  reference = transforms.resized_crop(Image.fromarray(image), draw.box, (32, 32))
  if draw.flip:
    reference = reference.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  for op in draw.ops:
    reference = transforms.apply_rand_augment_op(reference, op)
  np.testing.assert_array_equal(example['image'], np.asarray(reference))


def test_train_transform_follows_the_config():
  assert transforms.train_transform(folder_config((64, 64))).aspect == 'squash'
  transform = transforms.train_transform(folder_config((64, 96), aspect='keep', host_max_side=48))
  assert transform.aspect == 'keep' and transform.output_size == (32, 48)
  with pytest.raises(ValueError, match='aspect must be one of squash, keep'):
    keep_transform(aspect='crop')


def test_the_config_checks_the_new_choices():
  config = folder_config((64, 64))
  assert config.data.augment.aspect == 'squash'
  config.data.resize = 'none'
  assert config_lib.resolve(config).data.resize == 'none'
  config.data.augment.aspect = 'wide'
  with pytest.raises(config_lib.ConfigError, match=r'config.data.augment.aspect must be one of squash, keep'):
    config_lib.resolve(config)


def test_the_train_loader_stacks_the_sizes():
  source = [
    {'image': photo(*shape, index), 'label': index} for index, shape in enumerate([(40, 90), (120, 50)] * 2)
  ]
  transform = keep_transform()
  with pipeline.TrainLoader(source, 4, seed=0, transform=transform, max_bad_fraction=0.0) as loader:
    batch = next(loader)
  assert set(batch) == {'image', 'label', 'size'}
  assert batch['size'].shape == (4, 2) and batch['size'].dtype == np.int32
  assert (batch['size'] >= 1).all() and (batch['size'] <= 32).all()
  assert ((batch['size'] == 32).any(axis=1)).all()
  for image, (height, width) in zip(batch['image'], batch['size']):
    padding = normalize_image(np.zeros((1, 1, 3), np.uint8))[0, 0]
    np.testing.assert_array_equal(image[height:], np.broadcast_to(padding, image[height:].shape))


def test_eval_resize_none_keeps_each_image():
  image = photo(40, 90)
  assert transforms.eval_resize(image, (32, 32), 'none') is image
  np.testing.assert_array_equal(transforms.eval_resize(Image.fromarray(image), 32, 'none'), image)
  config = folder_config((32, 32))
  config.data.resize = 'none'
  assert transforms.eval_transform(config)({'image': image}, None)['image'] is image


class BadAt:
  """Examples of these sizes; the one at `bad` fails to decode."""

  def __init__(self, shapes, bad=None):
    self.shapes, self.bad = shapes, bad

  def __len__(self):
    return len(self.shapes)

  def __getitem__(self, index):
    if index == self.bad:
      raise BadImageError(f'example{index}.png', 'broken')
    return {'image': photo(*self.shapes[index], index), 'label': index}


@pytest.mark.parametrize('workers', [0, 2])
def test_eval_batches_pad_each_batch_to_its_own_canvas(workers):
  shapes = [(40, 90), (120, 50), (64, 64), (8, 8), (17, 33)]
  transform = transforms.EvalTransform((32, 32), 'none')
  batches = list(
    pipeline.eval_batches(
      BadAt(shapes, bad=3),
      2,
      workers=workers,
      transform=transform,
      max_bad_fraction=MAX_BAD_FRACTION,
      canvas_multiple=16,
    )
  )
  # Each canvas: the batch's largest height and width, rounded up to whole multiples of 16.
  assert [batch['image'].shape for batch in batches] == [(2, 128, 96, 3), (2, 64, 64, 3), (2, 32, 48, 3)]
  assert all(batch['size'].dtype == np.int32 for batch in batches)
  # The bad example (3) and the padding past the split: masked out, zeros, the whole canvas as their size.
  np.testing.assert_array_equal(batches[0]['size'], [(40, 90), (120, 50)])
  np.testing.assert_array_equal(batches[1]['size'], [(64, 64), (64, 64)])
  np.testing.assert_array_equal(batches[2]['size'], [(17, 33), (32, 48)])
  np.testing.assert_array_equal(np.concatenate([batch['mask'] for batch in batches]), [1, 1, 1, 0, 1, 0])
  for number, batch in enumerate(batches):
    for slot, (height, width) in enumerate(batch['size']):
      image, index = batch['image'][slot], 2 * number + slot
      if not batch['mask'][slot]:
        assert not image.any()
        continue
      np.testing.assert_array_equal(image[:height, :width], normalize_image(photo(*shapes[index], index)))
      assert not image[height:].any() and not image[:, width:].any()


def test_a_canvas_per_batch_takes_one_process():
  with pytest.raises(ValueError, match='takes one process'):
    pipeline.EvalLoader(BadAt([(8, 8)] * 4), 4, 0, 2, canvas_multiple=16, max_bad_fraction=0.0)
  with pytest.raises(ValueError, match='canvas_multiple must be an integer >= 1'):
    pipeline.EvalLoader(BadAt([(8, 8)] * 4), 4, canvas_multiple=0, max_bad_fraction=0.0)
