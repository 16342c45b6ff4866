"""Input data for training and evaluation: sources (random access by index) and the loader over them.

numpy and the standard library only, and nothing of models or JAX (DESIGN.md: `data/` knows nothing of
models), so the trainer can import it lazily and tests run without a device.
"""

from atlas_jax.data.pipeline import EvalLoader, TrainLoader, eval_batches
from atlas_jax.data.sources import DataSourceError, SyntheticLongRange, make_source

__all__ = ['DataSourceError', 'EvalLoader', 'SyntheticLongRange', 'TrainLoader', 'eval_batches',
           'make_source']
