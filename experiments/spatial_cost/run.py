"""What the spatial split costs per train step (docs/spatial.md): collective bytes against FLOPs.

python experiments/spatial_cost/run.py [--sizes=2048,4096] [--spatial=1,2,4,8] [--output=DIR]

Compiles the train step of Atlas-B (the reference widths and depths, `model.remat=block`, conv stem,
16 x 16 windows, 4 x 4 pooling, drop path and Mixup/CutMix on) for one image per step (batch 1, no
accumulation, mesh data 1, fsdp 1, spatial K) on K of 8 faked CPU devices, and reads the optimized HLO:
- halo bytes: the results of every collective-permute (the rows that neighbouring devices exchange
  around the stem's 3 x 3 convolutions, forward and backward);
- gathered bytes: the results of every all-gather (the coarse scales, which are replicated over `spatial`
  when their rows of windows do not divide by K);
- all-reduce bytes (BatchNorm statistics, the coarse scales' gradients, the parameters' gradients) and
  any other collective (reduce-scatter, all-to-all);
each counted as many times as it runs: an instruction inside a loop (the scanned blocks of a stage, the
remat's recomputation) counts once per iteration, by the loop's known trip count. The FLOPs per device are
those of the dots and convolutions, counted the same way, since XLA's `cost_analysis()` counts a loop's
body once; `xla_flops_loops_once` is its figure and `parsed_flops_loops_once` ours under the same rule, a
check of the parser (they differ by XLA's elementwise FLOPs, a few per cent).

Bytes are per device: the size of each result buffer on one device, which for an all-gather is the whole
gathered tensor (the device receives (K - 1) / K of it). No compute runs: lowering and compiling only. Each
point takes 20-60 s on the 2-core CPU machine. Writes DIR/results.csv (default: this folder).
"""

import argparse
import csv
import math
import os
import pathlib
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `python experiments/spatial_cost/run.py` from anywhere
  sys.path.insert(0, str(ROOT))
# 8 faked CPU devices, and XLA's CPU backend at its cheapest: the HLO passes (SPMD partitioning included)
# are the same, only machine code generation is cut.
_FLAGS = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _FLAGS:
  _FLAGS += ' --xla_force_host_platform_device_count=8'
os.environ['XLA_FLAGS'] = (
  _FLAGS + ' --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
).strip()

FIELDS = [
  'image_px',
  'spatial',
  'scales',
  'depths',
  'flops_per_device',
  'halo_bytes',
  'gathered_bytes',
  'all_reduce_bytes',
  'other_collective_bytes',
  'halo_bytes_per_mflop',
  'gathered_bytes_per_mflop',
  'all_reduce_bytes_per_mflop',
  'collective_permutes',
  'all_gathers',
  'all_reduces',
  'largest_all_gather_bytes',
  'scale0_activation_bytes',
  'xla_flops_loops_once',
  'parsed_flops_loops_once',
  'compile_s',
]
ITEM_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  's16': 2,
  'u16': 2,
  'f16': 2,
  'bf16': 2,
  's32': 4,
  'u32': 4,
  'f32': 4,
  's64': 8,
  'u64': 8,
  'f64': 8,
}
COLLECTIVES = {
  'collective-permute': 'halo',
  'all-gather': 'gathered',
  'all-reduce': 'all_reduce',
  'reduce-scatter': 'other_collective',
  'all-to-all': 'other_collective',
}
_ARRAY = re.compile(r'\b([a-z]+\d*)\[([\d,]*)\]')
_INSTRUCTION = re.compile(
  r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\([^=]*?\)|[a-z]+\d*\[[\d,]*\](?:\{[^}]*\})?)\s+([\w\-]+)\('
)
_CALLEES = re.compile(r'\b(?:body|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_COMMENT = re.compile(r'/\*.*?\*/')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [
    (dtype, tuple(int(d) for d in dims.split(',') if d))
    for dtype, dims in _ARRAY.findall(shape_text)
    if dtype in ITEM_BYTES
  ]


def _bytes(shape_text: str) -> int:
  return sum(ITEM_BYTES[dtype] * math.prod(dims) for dtype, dims in _arrays(shape_text))


def _dims(shape_text: str) -> tuple[int, ...]:
  (_, dims), *_ = _arrays(shape_text)
  return dims


def parse_hlo(text: str) -> dict:
  """Collective bytes and dot/convolution FLOPs of an optimized HLO module, each instruction weighted by
  how many times it runs (loop bodies by their known trip counts), and the FLOPs with every weight 1."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    line = _COMMENT.sub('', line)  # long tuples carry /*index=5*/ markers
    if line and not line[0].isspace() and line.rstrip().endswith('{'):
      header = line.split()
      name = header[1] if header[0] == 'ENTRY' else header[0]
      current = computations.setdefault(name.lstrip('%'), [])
      if header[0] == 'ENTRY':
        entry = name.lstrip('%')
    elif current is not None and line.strip() and line.strip() != '}':
      current.append(line)
  shapes = {}
  for lines in computations.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if match:
        shapes[match.group(1)] = match.group(2)

  # Each computation's count of runs: the entry once; a while body trip-count times its caller's.
  runs = {name: 0 for name in computations}
  order, seen = [], set()

  def visit(name):  # callers before callees (the call graph is acyclic)
    if name in seen:
      return
    seen.add(name)
    for line in computations[name]:
      for callee in _callees(line):
        visit(callee)
    order.append(name)

  visit(entry)
  runs_once = dict(runs)
  runs[entry] = runs_once[entry] = 1
  for name in reversed(order):
    for line in computations[name]:
      trips = _TRIP_COUNT.search(line)
      for callee in _callees(line):
        looped = ' while(' in line and f'body=%{callee}' in line
        runs[callee] += runs[name] * (int(trips.group(1)) if looped and trips else 1)
        runs_once[callee] += runs_once[name]

  totals = {f'{kind}_bytes': 0 for kind in set(COLLECTIVES.values())}
  counts = {op: 0 for op in COLLECTIVES}
  flops = flops_once = 0.0
  largest_gather = 0
  for name, lines in computations.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      shape, op = match.group(2), match.group(3)
      base = op[: -len('-done')] if op.endswith('-done') else op
      if base in COLLECTIVES and not op.endswith('-start'):
        size = _bytes(shape)
        totals[f'{COLLECTIVES[base]}_bytes'] += runs[name] * size
        counts[base] += runs[name]
        if base == 'all-gather':
          largest_gather = max(largest_gather, size)
      elif op in ('dot', 'convolution'):
        instruction_flops = _flops(line, op, shape, shapes)
        flops += runs[name] * instruction_flops
        flops_once += runs_once[name] * instruction_flops
  return {
    **totals,
    'collective_permutes': counts['collective-permute'],
    'all_gathers': counts['all-gather'],
    'all_reduces': counts['all-reduce'],
    'largest_all_gather_bytes': largest_gather,
    'flops_per_device': flops,
    'parsed_flops_loops_once': flops_once,
  }


def _callees(line: str) -> list[str]:
  callees = _CALLEES.findall(line)
  for branches in _BRANCHES.findall(line):
    callees += [branch.strip().lstrip('%') for branch in branches.split(',')]
  return callees


def _operands(line: str, op: str) -> list[str]:
  inside = line.split(f' {op}(', 1)[1].split(')', 1)[0]
  return [operand.strip().split()[-1].lstrip('%') for operand in inside.split(',')]


def _flops(line: str, op: str, shape: str, shapes: dict) -> float:
  """2 x multiply-adds of a dot (result size x contracted size) or a convolution (result size x the
  kernel's elements per output feature), as XLA's cost analysis counts them."""
  result = math.prod(_dims(shape))
  lhs, rhs = _operands(line, op)[:2]
  if op == 'dot':
    contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', line).group(1)
    lhs_dims = _dims(shapes[lhs])
    return 2.0 * result * math.prod(lhs_dims[int(d)] for d in contracting.split(',') if d)
  labels = re.search(r'dim_labels=\w+_(\w+)->', line).group(1)
  kernel = _dims(shapes[rhs])
  return 2.0 * result * math.prod(kernel) / kernel[labels.index('o')]


def measure(image_px: int, spatial: int) -> dict:
  import jax

  from atlas_jax import config as config_lib
  from atlas_jax import run_setup, sharding, train
  from configs import common

  config = common.base_config('B', image_px)
  config.model.remat = 'block'
  config.batch_size = 1
  config.grad_accum_steps = 1
  config.mesh.update(data=1, fsdp=1, spatial=spatial)
  config.data.source = 'synthetic'  # the batch arrives at image_size: no host-side share of the transform
  config.compilation_cache_dir = ''
  config = config_lib.resolve(config)
  setup = run_setup.train_setup(config, sharding.make_mesh(config, jax.devices()[:spatial]))
  step = train.jit_train_step(setup)
  start = time.perf_counter()
  with jax.set_mesh(setup.mesh):
    compiled = step.lower(*train.abstract_step_arguments(setup)).compile()
  compile_s = time.perf_counter() - start
  row = parse_hlo(compiled.as_text())
  flops = row['flops_per_device']
  tokens = (image_px // config.model.patch_size) ** 2
  row.update(
    image_px=image_px,
    spatial=spatial,
    scales=len(config.model.depths),
    depths='x'.join(str(depth) for depth in config.model.depths),
    xla_flops_loops_once=float(compiled.cost_analysis()['flops']),
    # One device's share of the scale-0 tokens, (tokens / K, dim), in the compute dtype (bfloat16).
    scale0_activation_bytes=tokens // spatial * config.model.dim * 2,
    compile_s=round(compile_s, 1),
  )
  for kind in ('halo', 'gathered', 'all_reduce'):
    row[f'{kind}_bytes_per_mflop'] = round(row[f'{kind}_bytes'] / (flops / 1e6), 4) if flops else ''
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default='2048,4096', help='square image sides in pixels')
  parser.add_argument('--spatial', default='1,2,4,8', help='spatial splits, each at most 8')
  parser.add_argument('--output', default=str(pathlib.Path(__file__).parent))
  args = parser.parse_args(argv)
  rows = []
  output = pathlib.Path(args.output)
  output.mkdir(parents=True, exist_ok=True)
  for image_px in (int(size) for size in args.sizes.split(',')):
    for spatial in (int(k) for k in args.spatial.split(',')):
      row = measure(image_px, spatial)
      rows.append(row)
      print(
        f'{image_px} px spatial {spatial}: {row["flops_per_device"] / 1e12:.3f} TFLOP/device, halo '
        f'{row["halo_bytes"] / 2**20:.1f} MiB, gathered {row["gathered_bytes"] / 2**20:.1f} MiB, '
        f'all-reduce {row["all_reduce_bytes"] / 2**20:.1f} MiB ({row["compile_s"]} s compile)',
        flush=True,
      )
      with open(output / 'results.csv', 'w', newline='') as file:
        writer = csv.DictWriter(file, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
  print(f'wrote {output / "results.csv"}')


if __name__ == '__main__':
  main()
