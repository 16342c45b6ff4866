r"""Exports a trained or converted workdir for serving: one `jax.export` artifact, weights inside.

python -m atlas_jax.tools.export --checkpoint=WORKDIR --output=DIR [--batch_size=N] [--step=S] [--ema] \
    [--dtype=float32|bfloat16|float16]

writes
  DIR/model.jax        a serialized `jax.export.Exported`: uint8 images (batch, H, W, 3) at the config's
                       `image_size` -> float32 logits (batch, num_classes). ImageNet normalisation (the
                       evaluation transform's last step, atlas_jax/normalization.py) and the weights (as
                       constants) are inside, so serving needs only JAX:
                         exported = jax.export.deserialize(open('DIR/model.jax', 'rb').read())
                         logits = exported.call(images_uint8)
  DIR/signature.json   input name/shape/dtype, output shape/dtype, image_size, num_classes, the step and
                       weights (raw or EMA) exported, a summary of the model config, the platforms the
                       artifact was lowered for, the JAX version that wrote it
  DIR/labels.txt       the class names, one per line in index order (as predict names them)

The weights are the step predict would use: the best recorded, else the latest; `--step` picks another,
`--ema` the EMA weights. Resizing is left to the caller (the artifact takes images at `image_size`; predict's
`--resize=squash` is a bicubic resize to it). The artifact is lowered for the CPU and CUDA when this JAX can
lower for both (`jax.export` lowers for CUDA without a GPU), else for the CPU only; signature.json says which.
`--batch_size=0` exports a symbolic batch dimension (any batch size at call time) when the model traces with
one; `--batch_size=N` (default 1) fixes it. The compute dtype is float32 unless `--dtype` says; attention is
XLA's whatever `model.attention` says, so one artifact runs on every platform it was lowered for.
"""

import json
import pathlib

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax import config as config_lib
from atlas_jax import inference, normalization
from atlas_jax import workdir as workdir_lib
from atlas_jax.errors import AtlasError, one_line_errors

PLATFORMS = ('cpu', 'cuda')
INPUT_NAME = 'images'
ARTIFACT, SIGNATURE, LABELS = 'model.jax', 'signature.json', 'labels.txt'
# uint8 -> (x / 255 - mean) / std as one multiply-add per channel, the constants normalize_image uses.
_SCALE = (1.0 / (255.0 * np.asarray(normalization.IMAGENET_STD))).astype(np.float32)
_OFFSET = (-np.asarray(normalization.IMAGENET_MEAN) / np.asarray(normalization.IMAGENET_STD)).astype(
  np.float32
)
MODEL_SUMMARY_FIELDS = (
  'name',
  'variant',
  'dim',
  'num_heads',
  'depths',
  'patch_size',
  'stem_width',
  'window',
  'pool',
  'parent_window',
  'communication',
  'composition',
  'num_classes',
  'dtype',
)


class ExportError(AtlasError, ValueError):
  """A workdir or an output that cannot be exported: a bad batch size, an output that is a file."""


def define_flags():
  """The command line's flags; defined only when run as a program, so the module imports anywhere."""
  global _CHECKPOINT, _OUTPUT, _BATCH_SIZE, _STEP, _EMA, _DTYPE
  _CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Workdir holding checkpoints/ and config.json.')
  _OUTPUT = flags.DEFINE_string('output', None, 'Folder to write model.jax, signature.json, labels.txt to.')
  _BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', 1, 'Images per call, fixed in the artifact; 0: a symbolic batch dimension (any size).'
  )
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the best recorded, else the latest.')
  _EMA = flags.DEFINE_bool('ema', False, 'Export the EMA weights of the checkpoint.')
  _DTYPE = flags.DEFINE_enum(
    'dtype', 'float32', ['float32', 'bfloat16', 'float16'], 'Compute dtype inside the artifact.'
  )


def normalize(images: jax.Array) -> jax.Array:
  """uint8 (..., 3) -> float32 (x / 255 - mean) / std with ImageNet's, as normalize_image on the host."""
  return images.astype(jnp.float32) * _SCALE + _OFFSET


def serving_function(model, variables):
  """uint8 images -> float32 logits, the variables closed over (constants of the lowered module)."""
  variables = jax.tree.map(np.asarray, variables)  # host copies: no device or sharding in the artifact

  def serve(images):
    return model.apply(variables, normalize(images)).astype(jnp.float32)

  return serve


def input_spec(batch_size: int, image_size) -> jax.ShapeDtypeStruct:
  """The artifact's input: uint8 (batch, H, W, 3); batch 0 means symbolic ('b')."""
  batch = jax.export.symbolic_shape('b')[0] if batch_size == 0 else batch_size
  return jax.ShapeDtypeStruct((batch, *image_size, 3), jnp.uint8)


def lower(serve, spec: jax.ShapeDtypeStruct, platforms=PLATFORMS) -> jax.export.Exported:
  """`jax.export` of `serve` for `platforms`; for the CPU alone when lowering for all of them fails."""
  try:
    return jax.export.export(jax.jit(serve), platforms=platforms)(spec)
  except Exception as error:  # noqa: BLE001 (any lowering failure: a platform this build cannot lower for)
    if tuple(platforms) == ('cpu',):
      raise
    reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
    logging.warning('lowering for %s failed (%s); exporting for the CPU only', ', '.join(platforms), reason)
    return jax.export.export(jax.jit(serve), platforms=('cpu',))(spec)


def model_summary(config) -> dict:
  """The model fields a server may want to know: what the artifact computes."""
  model = config.model
  summary = {}
  for field in MODEL_SUMMARY_FIELDS:
    value = model.get(field)
    summary[field] = list(value) if isinstance(value, tuple) else value
  return summary


def check_serialization() -> None:
  """ExportError unless `jax.export` can serialize here: it needs the flatbuffers package."""
  try:
    import flatbuffers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise ExportError(
      'serializing a jax.export artifact needs the flatbuffers package: pip install flatbuffers'
    ) from None


def export(
  workdir,
  output,
  batch_size: int = 1,
  step: int | None = None,
  use_ema: bool = False,
  dtype: str = 'float32',
) -> dict:
  """Exports `workdir`'s weights at `step` to `output`; returns the signature written (signature.json)."""
  if batch_size < 0:
    raise ExportError(f'--batch_size must be a positive number of images, or 0 for any, got {batch_size}')
  output = pathlib.Path(output)
  if output.exists() and not output.is_dir():
    raise ExportError(f'--output={output} is a file; point it at a new or empty folder')
  check_serialization()
  config = workdir_lib.read_config(workdir)
  # XLA's attention lowers for every platform; cuDNN's (model.attention auto on a GPU in half precision)
  # would tie the artifact to CUDA. The parameters are the same either way.
  config.model.attention = 'xla'
  predictor = inference.load(workdir, step=step, dtype=dtype, use_ema=use_ema, config=config, batch_size=1)
  config = predictor.config
  image_size = tuple(int(side) for side in config.image_size)
  labels = list(predictor.labels)
  serve = serving_function(predictor.model, predictor.variables)
  symbolic = batch_size == 0
  if symbolic:
    try:
      exported = lower(serve, input_spec(0, image_size))
    except Exception as error:  # noqa: BLE001 (a shape the model cannot trace symbolically)
      raise ExportError(
        f'the model does not trace with a symbolic batch dimension ({type(error).__name__}: '
        f'{" ".join(str(error).split())[:200]}); pass --batch_size=N'
      ) from None
  else:
    exported = lower(serve, input_spec(batch_size, image_size))
  num_classes = int(config.model.num_classes)
  batch = None if symbolic else batch_size
  signature = {
    'format': 'jax.export',
    'inputs': [{'name': INPUT_NAME, 'shape': [batch, *image_size, 3], 'dtype': 'uint8'}],
    'outputs': [{'name': 'logits', 'shape': [batch, num_classes], 'dtype': 'float32'}],
    'batch_size': batch,
    'image_size': list(image_size),
    'num_classes': num_classes,
    'normalization': {
      'mean': list(normalization.IMAGENET_MEAN),
      'std': list(normalization.IMAGENET_STD),
      'note': 'inside the artifact: pass uint8 RGB pixels (0-255)',
    },
    'step': int(predictor.step),
    'weights': 'ema' if use_ema else 'raw',
    'compute_dtype': dtype,
    'model': model_summary(config),
    'platforms': list(exported.platforms),
    'jax_version': jax.__version__,
    'calling_convention_version': int(exported.calling_convention_version),
    'labels': LABELS,
  }
  output.mkdir(parents=True, exist_ok=True)
  (output / ARTIFACT).write_bytes(exported.serialize())
  (output / SIGNATURE).write_text(json.dumps(signature, indent=2) + '\n')
  (output / LABELS).write_text(''.join(f'{label}\n' for label in labels))
  return signature


@one_line_errors
def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  for name, flag in (('--checkpoint', _CHECKPOINT), ('--output', _OUTPUT)):
    if flag.value is None:
      raise ExportError(f'{name} is required')
  signature = export(
    _CHECKPOINT.value, _OUTPUT.value, _BATCH_SIZE.value, _STEP.value, _EMA.value, _DTYPE.value
  )
  output = pathlib.Path(_OUTPUT.value)
  shape = 'x'.join('b' if side is None else str(side) for side in signature['inputs'][0]['shape'])
  print(
    f'wrote {output / ARTIFACT}: uint8 ({shape}) -> float32 logits of {signature["num_classes"]} classes, '
    f'step {signature["step"]} ({signature["weights"]} weights), for {", ".join(signature["platforms"])}'
  )
  print(f'wrote {output / SIGNATURE} and {output / LABELS}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)  # command-line mistakes: one line
