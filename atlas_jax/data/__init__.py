"""Input data for training and evaluation: sources (random access by index) and the loader over them.

numpy, PIL and the standard library only, and nothing of models or JAX (docs/design.md: `data/` knows
nothing of models), so the trainer can import it lazily and tests run without a device. Import the modules
themselves (`from atlas_jax.data import pipeline, sources`): this package imports none of them, so taking
one does not load the others.
"""
