"""Test-wide settings: XLA's CPU backend without its slow optimisation passes.

The tests compile many small graphs; at optimisation level 0 XLA compiles them about twice as fast,
and the results are the same numbers (parity tolerances are unchanged).
"""

import os

if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
