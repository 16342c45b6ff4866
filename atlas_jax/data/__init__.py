"""Input data for training and evaluation: sources (random access by index) and the loader over them.

numpy and the standard library only, and nothing of models or JAX (DESIGN.md: `data/` knows nothing of
models), so the trainer can import it lazily and tests run without a device.
"""

from atlas_jax.data.decode import BadImageError, decode_image
from atlas_jax.data.pipeline import EvalLoader, TooManyBadExamples, TrainLoader, eval_batches
from atlas_jax.data.sources import DataSourceError, ImageFolder, SyntheticLongRange, TfdsSource, make_source

__all__ = ['BadImageError', 'DataSourceError', 'EvalLoader', 'ImageFolder', 'SyntheticLongRange',
           'TfdsSource', 'TooManyBadExamples', 'TrainLoader', 'decode_image', 'eval_batches', 'make_source']
