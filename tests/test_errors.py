"""errors.one_line_errors: a user error is one `error:` line and exit code 1; a bug keeps its traceback."""

import pytest

from atlas_jax.errors import AtlasError, one_line_errors
from atlas_jax.models.layout import LayoutError


def test_a_user_error_is_one_line_and_exit_code_1(capsys):
  @one_line_errors
  def main(argv):
    raise LayoutError('image size 1000x1000 does not fit: use 1024x1024')

  with pytest.raises(SystemExit) as exit_info:
    main(['prog'])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == 'error: image size 1000x1000 does not fit: use 1024x1024\n'


def test_any_other_exception_keeps_its_traceback():
  @one_line_errors
  def main(argv):
    raise ValueError('a bug, not a user error')

  with pytest.raises(ValueError, match='a bug'):
    main(['prog'])


def test_the_user_errors_of_every_layer_derive_from_atlas_error():
  from atlas_jax import checkpointing, config, inference, predict, sharding, train, transfer, workdir
  from atlas_jax.data import decode, pipeline, sources
  from atlas_jax.models import reference_names
  from atlas_jax.tools import convert_torch, input_benchmark, prepare_hr_in100, torch_checkpoint

  errors = [
    config.ConfigError,
    checkpointing.CheckpointError,
    inference.InferenceError,
    predict.PredictError,
    sharding.MeshError,
    train.TrainingDiverged,
    train.ResumeError,
    transfer.InitFromError,
    workdir.WorkdirNotFound,
    workdir.ConfigFileError,
    decode.BadImageError,
    pipeline.TooManyBadExamples,
    sources.DataSourceError,
    reference_names.ReferenceMismatchError,
    LayoutError,
    convert_torch.ConversionError,
    input_benchmark.BenchmarkError,
    prepare_hr_in100.PrepareError,
    torch_checkpoint.UnsafeCheckpointError,
    torch_checkpoint.CheckpointFormatError,
  ]
  assert all(issubclass(error, AtlasError) for error in errors), [
    e for e in errors if not issubclass(e, AtlasError)
  ]
