r"""Writes HR-IN100 (the 100 ImageNet classes of the reference, train and all validation images) as an image
folder that `data.source=folder` reads.

python -m atlas_jax.tools.prepare_hr_in100 --source=IMAGENET_FOLDER_OR_TFDS_DIR --output=DIR \
    [--classes=FILE] [--splits=train,val] [--tfds_name=imagenet2012] [--copy] [--workers=8]

--source is either an ImageNet folder (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`: validation images sorted
into class folders) or a tensorflow_datasets directory holding a prepared `imagenet2012` (ArrayRecord or
TFRecord; read without TensorFlow). The output is `DIR/train/<wnid>/<file>` and `DIR/val/<wnid>/<file>`:
the files as they are, hard links to a source folder's files where the file system allows (else copies;
`--copy` always copies), the stored bytes of a tfds record (the original JPEG) under its `file_name`.
Nothing is re-encoded, so nothing is lost and the loader decodes the originals.

Classes: the WordNet IDs of `--classes` (default atlas_jax/resources/imagenet100_classes.txt); a class the
source lacks in a split is an error, reported before anything is written. Idempotent and safe to
interrupt: each file is written under a hidden temporary name and renamed into place, a file already in
place with the right size is kept, and leftover temporary files are removed. `DIR/hr_in100.json` records
the classes and counts once every file is in place.
"""

import concurrent.futures
import io
import json
import os
import pathlib
import shutil

from absl import app, flags, logging
from PIL import Image

from atlas_jax.data import sources
from atlas_jax.errors import AtlasError, one_line_errors

SPLIT_DIRS = {'train': 'train', 'val': 'validation'}  # output folder -> the source split it comes from
TMP_MARK = '.tmp-'
SUMMARY_FILE = 'hr_in100.json'


def define_flags():
  """The command line's flags; defined only when run as a program, so the module imports anywhere."""
  global _SOURCE, _OUTPUT, _CLASSES, _SPLITS, _TFDS_NAME, _COPY, _WORKERS
  _SOURCE = flags.DEFINE_string(
    'source', None, 'An ImageNet folder (train/, val/ by class) or a tfds data_dir.'
  )
  _OUTPUT = flags.DEFINE_string('output', None, 'The image folder to write (train/<wnid>/, val/<wnid>/).')
  _CLASSES = flags.DEFINE_string('classes', str(sources.HR_IN100_CLASSES), 'Class-list file (WordNet IDs).')
  _SPLITS = flags.DEFINE_list('splits', ['train', 'val'], 'Which of train, val to write.')
  _TFDS_NAME = flags.DEFINE_string('tfds_name', 'imagenet2012', 'The tfds dataset in --source, if tfds.')
  _COPY = flags.DEFINE_boolean('copy', False, 'Copy files from a source folder instead of hard-linking them.')
  _WORKERS = flags.DEFINE_integer('workers', 8, 'Threads writing files.')


class PrepareError(AtlasError, ValueError):
  """A source that does not hold the classes asked for, or an output that cannot be written."""


def _is_folder_source(source: pathlib.Path) -> bool:
  return (source / 'train').is_dir() or (source / 'val').is_dir()


def _folder_plan(source: pathlib.Path, classes: list[str], splits: list[str]) -> list[tuple]:
  """(output split dir, class, file name, source path) of every file, after checking every class is there."""
  missing = {}
  for split in splits:
    lacking = [name for name in classes if not (source / split / name).is_dir()]
    if lacking:
      missing[split] = lacking
  if missing:
    detail = '; '.join(
      f'{source / split}/ lacks {sources.abbreviated(names)}' for split, names in missing.items()
    )
    raise PrepareError(
      f'{detail}: --source must hold {split}/<wnid>/ for every class of --classes (sort the '
      'validation images into class folders first)'
    )
  plan = []
  for split in splits:
    for name in classes:
      files = sorted(
        entry.name
        for entry in os.scandir(source / split / name)
        if entry.is_file() and not entry.name.startswith('.')
      )
      if not files:
        raise PrepareError(f'{source / split / name} holds no files: the source is incomplete')
      plan.extend((split, name, file, source / split / name / file) for file in files)
  return plan


def _tfds_plan(source: pathlib.Path, tfds_name: str, classes_file: str, splits: list[str]) -> list[tuple]:
  """(output split dir, class, file name, (TfdsSource, index)) of every record of the classes."""
  from atlas_jax import config as config_lib  # pylint: disable=import-outside-toplevel

  common = config_lib.common_module()  # the shipped configs' defaults, installed or in the repository
  # The plan copies stored bytes and never decodes, so data.max_pixels only has to be a valid value.
  data_defaults = common.data_config()
  plan = []
  for split in splits:
    try:
      records = sources.TfdsSource(
        tfds_name,
        source,
        SPLIT_DIRS[split],
        classes_file=classes_file,
        max_pixels=data_defaults.max_pixels,
        max_decode_bytes=data_defaults.max_decode_bytes,
      )
    except sources.DataSourceError as error:
      raise PrepareError(str(error)) from error
    counts = [0] * records.num_classes
    for index, label in enumerate(records.scanned_labels.tolist()):  # the classes filter made the scan
      counts[label] += 1
      plan.append((split, records.classes[label], None, (records, index)))
    empty = [name for name, count in zip(records.classes, counts) if not count]
    if empty:
      raise PrepareError(
        f'the {records.split!r} split of {records.name} has no example of '
        f'{sources.abbreviated(empty)}: the source is incomplete'
      )
  return plan


def _file_name_of_record(example: dict) -> str:
  if example['file_name']:
    return os.path.basename(example['file_name'])
  image_format = Image.open(io.BytesIO(example['image'])).format or 'img'
  return f'{example["record"]:08d}.{image_format.lower()}'


def _write(output: pathlib.Path, split: str, name: str, file_name: str | None, origin, copy: bool) -> str:
  """Puts one file in place (under a temporary name first); returns 'kept' or 'written'."""
  directory = output / split / name
  if isinstance(origin, tuple):  # a tfds record
    records, index = origin
    example = records.encoded(index)
    data = example['image']
    file_name = _file_name_of_record(example)
    size = len(data)
  else:
    data = None
    size = origin.stat().st_size
  target = directory / file_name
  if target.is_file() and target.stat().st_size == size:
    return 'kept'
  temporary = directory / f'.{file_name}{TMP_MARK}{os.getpid()}'
  temporary.unlink(missing_ok=True)
  if data is not None:
    with open(temporary, 'wb') as stream:
      stream.write(data)
      stream.flush()
      os.fsync(stream.fileno())
  elif copy:
    shutil.copyfile(origin, temporary)
  else:
    try:
      os.link(origin, temporary)
    except OSError:  # another file system, or links not allowed
      shutil.copyfile(origin, temporary)
  os.replace(temporary, target)
  return 'written'


def _remove_leftovers(output: pathlib.Path) -> int:
  removed = 0
  for split in SPLIT_DIRS:
    for path in (output / split).glob(f'*/.*{TMP_MARK}*'):
      path.unlink()
      removed += 1
  return removed


def prepare(
  source,
  output,
  classes_file=sources.HR_IN100_CLASSES,
  splits=('train', 'val'),
  tfds_name: str = 'imagenet2012',
  copy: bool = False,
  workers: int = 8,
) -> dict:
  """Writes the image folder; returns the summary also written to OUTPUT/hr_in100.json."""
  source, output = pathlib.Path(source).expanduser(), pathlib.Path(output).expanduser()
  splits = list(splits)
  unknown = [split for split in splits if split not in SPLIT_DIRS]
  if unknown or not splits:
    raise PrepareError(f'--splits takes train and/or val, got {",".join(splits) or "nothing"}')
  if not source.is_dir():
    raise PrepareError(f'--source={source} is not a directory: give an ImageNet folder or a tfds data_dir')
  try:
    classes = sources.read_class_list(classes_file)
  except sources.DataSourceError as error:
    raise PrepareError(str(error)) from error
  if output.resolve() == source.resolve():
    raise PrepareError('--output must differ from --source')
  if _is_folder_source(source):
    kind = 'folder'
    plan = _folder_plan(source, classes, splits)
  elif (source / tfds_name.partition(':')[0]).is_dir():
    kind = 'tfds'
    plan = _tfds_plan(source, tfds_name, classes_file, splits)
  else:
    raise PrepareError(
      f'--source={source} holds neither train/ or val/ (an ImageNet folder) nor a prepared '
      f'{tfds_name}/ (a tfds data_dir): point it at one of them'
    )
  for split in splits:
    for name in classes:
      (output / split / name).mkdir(parents=True, exist_ok=True)
  removed = _remove_leftovers(output)
  outcomes = {'kept': 0, 'written': 0}
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as executor:
    futures = [executor.submit(_write, output, *entry, copy) for entry in plan]
    for number, future in enumerate(concurrent.futures.as_completed(futures), 1):
      outcomes[future.result()] += 1
      if number % 10_000 == 0:
        logging.info('%d of %d files in place', number, len(plan))
  counts = {split: sum(1 for entry in plan if entry[0] == split) for split in splits}
  summary = {
    'source': str(source),
    'source_kind': kind,
    'classes': classes,
    'counts': counts,
    'written': outcomes['written'],
    'kept': outcomes['kept'],
    'leftovers_removed': removed,
  }
  temporary = output / f'.{SUMMARY_FILE}{TMP_MARK}{os.getpid()}'
  temporary.write_text(json.dumps(summary, indent=1) + '\n')
  os.replace(temporary, output / SUMMARY_FILE)
  return summary


@one_line_errors
def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _SOURCE.value or not _OUTPUT.value:
    raise app.UsageError('--source and --output are required')
  try:
    summary = prepare(
      _SOURCE.value,
      _OUTPUT.value,
      _CLASSES.value,
      _SPLITS.value,
      _TFDS_NAME.value,
      _COPY.value,
      _WORKERS.value,
    )
  except OSError as error:  # the output cannot be written: a full disk, no permission, ...
    raise PrepareError(f'cannot write {_OUTPUT.value}: {error}') from None
  counts = ', '.join(f'{count} {split}' for split, count in summary['counts'].items())
  print(
    f'{_OUTPUT.value}: {len(summary["classes"])} classes, {counts} images ({summary["written"]} written, '
    f'{summary["kept"]} already in place); read it with --config.data.source=folder '
    f'--config.data.data_dir={_OUTPUT.value}'
  )


if __name__ == '__main__':
  define_flags()
  app.run(main)
