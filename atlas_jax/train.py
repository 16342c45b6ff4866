"""Training: the state, the jitted step, and the loop (evaluation, checkpoints, logging, preemption).

One optimizer step (`train_step`) consumes one global batch of `batch_size` examples, split into
`grad_accum_steps` micro-batches. Each micro-batch gets its own Mixup/CutMix draw and drop-path masks
and updates the BatchNorm statistics once, as a PyTorch loop that calls backward per micro-batch.
Every random draw of step s comes from `fold_in(state.rng, s)`, so a resumed run repeats exactly the
draws of an uninterrupted one.

The data sources and host transforms are imported inside `run`, never at module scope: the step builds (for
the benchmark) without the image and dataset libraries.
"""

import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from atlas_jax import augment, checkpointing, evaluate, losses, optim, run_setup, sharding, storage, transfer
from atlas_jax import config as config_lib
from atlas_jax import metrics as metrics_lib
from atlas_jax import profiling as profiling_lib
from atlas_jax import progress as progress_lib
from atlas_jax import workdir as workdir_lib
from atlas_jax.errors import AtlasError
from atlas_jax.models import build_model
from atlas_jax.run_setup import TrainState

# Fields a resumed run must share with the run that wrote the workdir; the rest (total_steps,
# intervals, workers, ...) may change between restarts.
RESUME_FIELDS = (
  'image_size',
  'model',
  'batch_size',
  'grad_accum_steps',
  'seed',
  'mixup',
  'data.source',
  'optimizer.trainable',  # the optimizer state holds the trainable leaves only
)


class TrainingDiverged(AtlasError, FloatingPointError):
  """The loss became NaN or Inf."""


class ResumeError(AtlasError, ValueError):
  """A workdir that holds a run of another config: another model, batch size or seed."""


def make_train_step(config, model, optimizer, mesh=None):
  """(state, batch {'image' (B, h, w, 3) float, 'label' (B,) int}) -> (state, metrics of the step).

  On real data the batch comes at `loader_image_size(config)` and the step finishes the train transform
  (augment.train_finish: upsampling to `image_size`, random erasing) before Mixup/CutMix. A batch with
  'size' (B, 2) int32 (`data.augment.aspect='keep'`: each image's valid top-left region) has the sizes
  scaled and mixed alike and passed to the model, which masks the rest.
  With `mesh`, each micro-batch is pinned to the batch sharding, so every device keeps its own examples
  through the accumulation loop whatever XLA's propagation would choose.
  With optimizer.trainable='head' the backbone is frozen: applied as in evaluation (no drop path, BatchNorm
  on its running averages, batch_stats kept as they are) and differentiated only in the readout.
  """
  accum_steps = config.grad_accum_steps
  num_classes = config.model.num_classes
  mixup = dict(config.mixup)
  schedule = optim.learning_rate_schedule(config)
  ema_decay = config.ema.decay
  finish = augment.train_finish(config)  # None for the synthetic task, which has no transform
  head_only = optim.head_only(config)

  def train_step(state: TrainState, batch):
    frozen = {name: value for name, value in state.params.items() if name != optim.READOUT}
    trained = state.params[optim.READOUT] if head_only else state.params

    def micro_step(carry, micro_batch):
      batch_stats, rng = carry
      images = micro_batch['image']
      sizes = micro_batch['size'] if 'size' in micro_batch else None  # (B/k, 2) with aspect='keep'
      if finish is None:
        rng, mix_rng, dropout_rng = jax.random.split(rng, 3)
      else:  # a fourth key only here: the synthetic task's random streams stay as they were
        rng, mix_rng, dropout_rng, finish_rng = jax.random.split(rng, 4)
        images, sizes = finish(finish_rng, images, sizes)  # (B/k, H, W, 3)
      if sizes is None:
        images, targets = augment.mixup_cutmix(mix_rng, images, micro_batch['label'], num_classes, **mixup)
      else:
        images, targets, sizes = augment.mixup_cutmix(
          mix_rng, images, micro_batch['label'], num_classes, **mixup, sizes=sizes
        )

      def loss_fn(params):
        logits, updates = model.apply(
          run_setup.model_variables(params, batch_stats),
          images,
          train=True,
          sizes=sizes,
          rngs={'dropout': dropout_rng},
          mutable=['batch_stats'],
        )
        return losses.soft_target_cross_entropy(logits, targets), updates.get('batch_stats', {})

      def head_loss_fn(head):
        # Only the head is differentiated; the frozen backbone carries no tangents, so no backward pass.
        params = {**jax.lax.stop_gradient(frozen), optim.READOUT: head}
        logits = model.apply(run_setup.model_variables(params, batch_stats), images, train=False, sizes=sizes)
        return losses.soft_target_cross_entropy(logits, targets), batch_stats

      (loss, batch_stats), grads = jax.value_and_grad(head_loss_fn if head_only else loss_fn, has_aux=True)(
        trained
      )
      return (batch_stats, rng), (loss, ()), grads

    micro_batches = optim.split_micro_batches(batch, accum_steps)  # leaves (k, B / k, ...)
    if mesh is not None:  # each micro-batch split as the batch is: examples, and an image's rows (spatial)
      micro_batches = jax.lax.with_sharding_constraint(
        micro_batches, sharding.micro_batch_shardings(mesh, micro_batches)
      )
    step_rng = jax.random.fold_in(state.rng, state.step)
    (batch_stats, _), loss, _, grads = optim.accumulated_grads(
      micro_step, micro_batches, (state.batch_stats, step_rng), trained
    )
    if head_only:  # zeros (constants) for the frozen leaves: the optimizer gives them zero updates, no state
      grads = {**jax.tree.map(jnp.zeros_like, frozen), optim.READOUT: grads}
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = None if state.ema_params is None else optim.ema_update(state.ema_params, params, ema_decay)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
    new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema_params=ema_params
    )
    return new_state, metrics

  return train_step


def jit_train_step(setup: run_setup.TrainSetup):
  """The train step compiled for the setup's mesh: state sharded as `setup.state_sharding`, donated."""
  mesh = setup.mesh
  return jax.jit(
    make_train_step(setup.config, setup.model, setup.optimizer, mesh),
    in_shardings=(
      setup.state_sharding,
      sharding.batch_shardings(mesh, abstract_batch(setup.config, setup.config.batch_size)),
    ),
    out_shardings=(setup.state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def loader_image_size(config) -> tuple[int, int]:
  """(H, W) of the loader's training images: `image_size`, or on real data the host's share of the train
  transform (transforms.host_image_size), which the step upsamples."""
  if config.data.source == 'synthetic':
    return tuple(config.image_size)
  from atlas_jax.data import transforms  # imports the data package: kept out of module scope

  return transforms.host_image_size(config.image_size, config.data.augment.host_max_side)


def abstract_batch(config, batch_size: int):
  """The shapes of the loader's training batch: the step `run` jits, so mode=compile compiles the same one."""
  batch = {
    'image': jax.ShapeDtypeStruct((batch_size, *loader_image_size(config), 3), jnp.float32),
    'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32),
  }
  if has_sizes(config):
    batch['size'] = jax.ShapeDtypeStruct((batch_size, 2), jnp.int32)
  return batch


def abstract_step_arguments(setup: run_setup.TrainSetup):
  """(state, batch) of `jit_train_step(setup)` as jax.ShapeDtypeStructs placed as the step takes them: what
  to lower it with, on the setup's mesh, without any data."""
  abstract = abstract_batch(setup.config, setup.config.batch_size)
  batch = {
    key: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding.batch_sharding(setup.mesh, leaf.ndim))
    for key, leaf in abstract.items()
  }
  state = jax.tree.map(
    lambda leaf, placed: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placed),
    setup.abstract_state,
    setup.state_sharding,
  )
  return state, batch


def has_sizes(config) -> bool:
  """Whether training batches carry 'size': real data with `data.augment.aspect='keep'`."""
  return config.data.source != 'synthetic' and config.data.augment.aspect == 'keep'


def check_batch_sizes(config, mesh) -> None:
  """The batch, its micro-batches and the eval batch each split evenly over the data-parallel devices."""
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(
    config.batch_size // config.grad_accum_steps, mesh, 'config.batch_size / config.grad_accum_steps'
  )
  sharding.check_batch_size(config.eval.batch_size, mesh, 'config.eval.batch_size')


GIB = 2.0**30
# The note of a report whose analysis is XLA's CPU one while the plan is for another device's memory.
CPU_ANALYSIS_NOTE = (
  "memory_backend is cpu: XLA's CPU memory analysis overstates what a GPU needs, often by an order of "
  'magnitude, because the CPU backend does not reuse buffers as the GPU scheduler does; run mode=compile '
  'on the target accelerator for a figure to trust'
)


def device_memory(config) -> tuple[float, str]:
  """(GiB per device to plan for, its source): `config` (device_memory_gib > 0), `device` (the device's own
  bytes_limit) or `host` (CPU devices: the host's RAM shared by this process's devices)."""
  if config.device_memory_gib > 0:
    return float(config.device_memory_gib), 'config'
  devices = jax.local_devices()
  limit = (devices[0].memory_stats() or {}).get('bytes_limit')
  if limit:
    return limit / GIB, 'device'
  if jax.default_backend() == 'cpu':
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / len(devices) / GIB, 'host'
  raise AtlasError(
    f'the {jax.default_backend()} device reports no memory limit: pass --config.device_memory_gib=G, '
    'the memory of one device in GiB'
  )


def compile_only(config) -> dict:
  """`--config.mode=compile`: compiles the train step `run` jits, for the mesh and batch, without data; prints
  one JSON line with its memory per device, whether it fits (`fits`) and what would (`suggestions`)."""
  config = config_lib.resolve(config)
  setup = run_setup.train_setup(config)
  mesh = setup.mesh
  check_batch_sizes(config, mesh)  # what run refuses, compile refuses
  device_gib, device_source = device_memory(config)  # before compiling: a missing figure fails in seconds
  run_setup.print_start_lines(config, mesh, setup.abstract_state.params)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = (
      jit_train_step(setup).lower(setup.abstract_state, abstract_batch(config, config.batch_size)).compile()
    )
  memory = compiled.memory_analysis()
  report = {
    'devices': mesh.size,
    'mesh': dict(mesh.shape),
    'batch_size': config.batch_size,
    'grad_accum_steps': config.grad_accum_steps,
    'micro_batch_per_device': _micro_batch(config, sharding.data_parallel_size(mesh)),
    'compile_s': round(time.perf_counter() - start, 2),
    'argument_gib': memory.argument_size_in_bytes / GIB,
    'batch_gib': _batch_bytes_per_device(config, mesh) / GIB,  # of argument_gib: the images, labels
    'output_gib': memory.output_size_in_bytes / GIB,
    'temp_gib': memory.temp_size_in_bytes / GIB,
    'alias_gib': memory.alias_size_in_bytes / GIB,
  }
  # Donated state aliases its output, so it counts once.
  report['peak_gib_per_device'] = (
    report['argument_gib'] + report['output_gib'] - report['alias_gib'] + report['temp_gib']
  )
  report['device_memory_gib'] = device_gib
  report['device_memory_source'] = device_source
  report['memory_backend'] = jax.default_backend()
  report['fits'] = report['peak_gib_per_device'] <= device_gib
  report['suggestions'] = [] if report['fits'] else memory_suggestions(setup, memory, device_gib)
  if report['memory_backend'] == 'cpu' and device_source == 'config':
    report['note'] = CPU_ANALYSIS_NOTE
  if jax.process_index() == 0:
    print(json.dumps(report), flush=True)
  return report


def _micro_batch(config, data_parallel: int, grad_accum_steps: int | None = None) -> int:
  """Examples of one micro-batch on one device."""
  return config.batch_size // ((grad_accum_steps or config.grad_accum_steps) * data_parallel)


def _bytes_per_device(tree, fsdp: int, min_size: int) -> int:
  """Bytes one device holds of a state tree (ShapeDtypeStructs) split as sharding.state_shardings splits it
  over an fsdp axis of size `fsdp`."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    split = 'fsdp' in sharding.leaf_spec(leaf.shape, fsdp, min_size)
    total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize // (fsdp if split else 1)
  return total


def _batch_bytes_per_device(config, mesh) -> float:
  """Bytes of one device's share of the global batch, an argument of the step: its images are float32."""
  leaves = jax.tree.leaves(abstract_batch(config, config.batch_size))
  total = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves)
  return total / sharding.data_parallel_size(mesh)


def _gib_text(gib: float) -> str:
  return f'{gib:.1f}' if gib >= 10 else f'{gib:.3g}'


def memory_suggestions(setup: run_setup.TrainSetup, memory, device_gib: float) -> list[str]:
  """Flags that would make the step fit `device_gib` per device, each with its figure where one follows from
  this compile's memory analysis.

  The estimate splits the peak into the batch (the step's argument: global batch / data-parallel devices),
  the state (the rest of the arguments, counted once: donated), the gradients (the float32 sum and one
  micro-batch's, taken from the temporaries) and the other temporaries, which scale about linearly with the
  micro-batch per device. The state and gradients shrink as their leaves split over more fsdp devices.
  """
  config, mesh = setup.config, setup.mesh
  batch, accum, min_size = config.batch_size, config.grad_accum_steps, config.mesh.fsdp_min_size
  devices, fsdp = mesh.size, mesh.shape['fsdp']
  data_parallel = sharding.data_parallel_size(mesh)
  micro = _micro_batch(config, data_parallel)
  batch_bytes = _batch_bytes_per_device(config, mesh)
  state = memory.argument_size_in_bytes - batch_bytes
  other = memory.output_size_in_bytes - memory.alias_size_in_bytes  # the metrics: outputs not aliased
  state_bytes = _bytes_per_device(setup.abstract_state, fsdp, min_size)
  param_bytes = max(1, _bytes_per_device(setup.abstract_state.params, fsdp, min_size))
  grads = min(memory.temp_size_in_bytes, 2 * param_bytes)  # no batch axis: they do not shrink with it
  activations = memory.temp_size_in_bytes - grads

  def estimate(new_micro: int, new_fsdp: int, new_data_parallel: int) -> float:
    new_state = state + _bytes_per_device(setup.abstract_state, new_fsdp, min_size) - state_bytes
    new_grads = grads * _bytes_per_device(setup.abstract_state.params, new_fsdp, min_size) / param_bytes
    total = batch_bytes * data_parallel / new_data_parallel + new_state + other + new_grads
    return (total + activations * new_micro / micro) / GIB

  where = 'estimated from this compile'
  suggestions = []
  # More accumulation: the smallest that fits, else micro-batch 1.
  accums = [k for k in range(accum + 1, batch // data_parallel + 1) if batch % (k * data_parallel) == 0]
  accum_fits = False
  if accums:
    for k in accums:
      gib = estimate(_micro_batch(config, data_parallel, k), fsdp, data_parallel)
      if gib <= device_gib:
        accum_fits = True
        break
    new_micro = _micro_batch(config, data_parallel, k)
    suggestion = (
      f'--config.grad_accum_steps={k} (micro-batch {micro} -> {new_micro} per device): '
      f'about {_gib_text(gib)} GiB per device, {where}'
    )
    if not accum_fits:
      suggestion += f'; still over {_gib_text(device_gib)} GiB at the smallest micro-batch'
    suggestions.append(suggestion)
  if config.model.remat == 'none':
    suggestions.append(
      '--config.model.remat=block: recomputes each block in the backward pass; compile again to see its figure'
    )
  # A larger fsdp split over these devices: the batch per device stays, the state and gradients shrink.
  splits = [f for f in range(fsdp + 1, devices + 1) if devices % f == 0]
  split_fits = False
  for f in splits:
    gib = estimate(micro, f, data_parallel)
    if gib <= device_gib:
      split_fits = True
      break
  if splits:
    suggestion = (
      f'--config.mesh.fsdp={f} --config.mesh.data={devices // f} (the state split over {f} devices): '
      f'about {_gib_text(gib)} GiB per device, {where}'
    )
    if not split_fits:
      suggestion += f'; still over {_gib_text(device_gib)} GiB'
    suggestions.append(suggestion)
  if not split_fits:
    # More devices of this size, all in fsdp: the state, gradients, batch and micro-batch per device all
    # shrink; each device needs a whole micro-batch example.
    global_micro = batch // accum
    counts = [n for n in range(devices + 1, global_micro + 1) if global_micro % n == 0]
    for n in counts:
      gib = estimate(global_micro // n, n, n)
      if gib <= device_gib:
        suggestions.append(
          f'{n} devices of {_gib_text(device_gib)} GiB with --config.mesh.fsdp={n} --config.mesh.data=1 '
          f'(micro-batch {micro} -> {global_micro // n} per device): about {_gib_text(gib)} GiB per '
          f'device, {where}'
        )
        break
    else:
      if counts:
        suggestions.append(
          f'even {counts[-1]} devices with --config.mesh.fsdp={counts[-1]} --config.mesh.data=1 (micro-batch '
          f'1 per device) need about {_gib_text(gib)} GiB per device, {where}: over '
          f'{_gib_text(device_gib)} GiB'
        )
  if accums and not accum_fits and config.model.remat == 'none':
    suggestions.append(
      f'--config.grad_accum_steps={accums[-1]} --config.model.remat=block together (micro-batch {micro} -> '
      f'{_micro_batch(config, data_parallel, accums[-1])} per device, each block recomputed): compile again '
      'to see its figure'
    )
  return suggestions


# ---------------------------------------------------------------------------------------------------
# Checkpoint items.


def checkpoint_items(state: TrainState, loader_state) -> dict:
  return {
    'params': state.params,
    'batch_stats': state.batch_stats,
    'opt_state': state.opt_state,
    'ema_params': state.ema_params,
    'train_state': {'step': state.step, 'rng': state.rng},
    'data': loader_state,
  }


def restore_state(checkpoints, step: int, abstract_state: TrainState, state_sharding, loader_state):
  """(state, loader state) of `step`, each array placed as `state_sharding` says."""

  def with_sharding(tree, shardings):
    return jax.tree.map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), tree, shardings
    )

  abstract_items = checkpoint_items(with_sharding(abstract_state, state_sharding), loader_state)
  restored = checkpoints.restore(step, abstract_items)
  missing = {'params', 'opt_state', 'train_state', 'data'} - set(restored)
  if abstract_state.ema_params is not None and 'ema_params' not in restored:
    missing.add('ema_params')
  if missing:
    raise checkpointing.CheckpointError(
      f'step {step} under {checkpoints.directory} lacks {sorted(missing)}: it was not written by a '
      'training run with this config (use init_from to start from converted weights)'
    )
  state = TrainState(
    step=restored['train_state']['step'],
    params=restored['params'],
    batch_stats=restored.get('batch_stats', {}),
    opt_state=restored['opt_state'],
    ema_params=restored.get('ema_params'),
    rng=restored['train_state']['rng'],
  )
  return state, restored['data']


def check_resumable(workdir, config) -> None:
  """Refuses to resume a workdir written with another model, batch or seed, naming the field."""
  if not storage.isfile(workdir_lib.config_path(workdir)):
    return
  # Resolved: a config.json written before a field existed holds its default, as the run had.
  stored = config_lib.resolve(workdir_lib.read_config(workdir))
  for name in RESUME_FIELDS:
    ours, theirs = config_lib.get(config, name), config_lib.get(stored, name)
    if hasattr(ours, 'to_dict'):
      ours, theirs = ours.to_dict(), theirs.to_dict() if theirs is not None else None
    if ours != theirs:
      raise ResumeError(
        f'{workdir} holds a run with {name}={theirs!r}, this config has {ours!r}: '
        'resume with the same config or use a new --workdir'
      )


# ---------------------------------------------------------------------------------------------------
# Preemption.


class Preemption:
  """SIGTERM on any process -> every process saves the same step and returns (docs/design.md).

  The handler only sets this process's flag. Processes must stop at the same step, since a checkpoint is
  written collectively, so in a multi-process run they agree every `sync_steps` steps on the maximum of their
  flags (one all-gather of an int). This handler replaces the one jax.distributed installs, whose own sync
  point therefore never fires. One process reads its flag at every step.
  """

  def __init__(self, sync_steps: int = 1):
    self.sync_steps = sync_steps
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    # This process got SIGTERM; one that came before this handler, while the run started, counts too
    # (the handler atlas_jax.main installs first records it as `requested`).
    self.requested = bool(getattr(self._previous, 'requested', False))

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def stop_after(self, step: int) -> bool:
    """Whether every process stops after `step`; every process must call this at every step."""
    if jax.process_count() == 1:
      return self.requested
    if step % self.sync_steps:
      return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(self.requested))  # (process_count,)
    return bool(np.max(flags))

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class DivergenceGuard:
  """Which checkpoint is good: a step's checkpoint counts as good only once the loss computed from its
  weights (the next step's loss) is known finite, so the update that blew up is never the one resumed from.

  `check(step, metrics)` takes the metrics of step `step`, whose loss was computed from the weights of step
  `step - 1`. A non-finite loss sets the checkpoint of step `step - 1`, if one was saved, aside as
  `<step>.diverged` and raises TrainingDiverged naming the newest good step. Every saved step older than the
  newest was confirmed before the newest was saved, and retention keeps the two newest
  (checkpointing.Checkpoints), so the newest remaining step after the set-aside is good.
  """

  def __init__(self, checkpoints, last_saved: int | None):
    self.checkpoints = checkpoints
    self.last_saved = last_saved

  def saved(self, step: int) -> None:
    self.last_saved = step

  def check(self, step: int, metrics) -> None:
    loss = float(metrics['loss'])
    if np.isfinite(loss):
      return
    directory = self.checkpoints.directory
    set_aside = ''
    if self.last_saved is not None and self.last_saved == step - 1:
      if jax.process_index() == 0:
        target = self.checkpoints.set_aside(step - 1, 'diverged')
        set_aside = f" Step {step - 1}'s checkpoint, whose weights gave that loss, was set aside as {target}."
      run_setup.sync_processes(f'set aside step {step - 1}')
      if jax.process_index() != 0:
        self.checkpoints.manager.reload()
    good = self.checkpoints.latest_step()
    fix = 'a lower --config.lr or with --config.optimizer.clip_grad_norm=1.0'
    if good is None:
      advice = f'No checkpoint is known good: run the same command with {fix} to start again.'
    else:
      advice = (
        f'The newest good checkpoint is step {good} in {directory}: run the same command with {fix} to '
        'resume from it.'
      )
    raise TrainingDiverged(
      f'the loss is {loss} at step {step} (computed from the weights of step {step - 1}); stopped.'
      f'{set_aside} {advice}'
    )


# ---------------------------------------------------------------------------------------------------
# The loop.


def run(config, workdir, force_unlock: bool = False) -> TrainState:
  """Trains from scratch, from `init_from`, or from the workdir's newest good checkpoint; returns the final
  state. `force_unlock` takes the workdir's lock over from whoever holds it."""
  from atlas_jax.data import pipeline, sources, transforms  # the data libraries: kept out of module scope

  config = config_lib.resolve(config)
  evaluate.check_eval_resize(config)  # the periodic evaluation's data.resize, before anything is built
  workdir = storage.path(workdir)  # a pathlib.Path, or an etils.epath.Path for gs://
  is_main = jax.process_index() == 0
  setup = run_setup.train_setup(config)
  mesh = setup.mesh
  check_batch_sizes(config, mesh)
  num_classes = config.model.num_classes
  train_source = sources.make_source(config.data, config.image_size, 'train', config.seed, num_classes)
  if config.data.source == 'folder' and train_source.num_classes != num_classes:
    # A head wider than the folder's classes trains, and then predict cannot name its outputs.
    raise sources.DataSourceError(
      f'{config.data.data_dir}/train has {train_source.num_classes} classes but model.num_classes is '
      f'{num_classes}: set --config.model.num_classes={train_source.num_classes}'
    )
  val_source = sources.make_source(config.data, config.image_size, 'validation', config.seed, num_classes)
  check_resumable(workdir, config)  # reads only: a workdir of another run is left as it was
  lock = run_setup.take_workdir_lock(config, workdir, 'training', force_unlock, setup.abstract_state)
  checkpoints = None
  writer = None
  loader = None
  preemption = None
  try:
    eval_model = build_model(config, dtype=run_setup.compute_dtype(config))
    checkpoints = checkpointing.Checkpoints(
      workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    preemption = Preemption(config.checkpoint.preemption_sync_steps)
    with jax.set_mesh(mesh):
      loader = pipeline.TrainLoader(
        train_source,
        config.batch_size,
        seed=config.seed,
        # Processes of one spatial group load the same examples, each keeping its own rows.
        process_index=sharding.process_batch_slot(mesh)[0],
        process_count=sharding.process_batch_slot(mesh)[1],
        workers=config.data.workers,
        transform=transforms.train_transform(config),
        max_bad_fraction=config.data.max_bad_fraction,
      )
      restored, latest = restore_newest_good(checkpoints, setup, loader.get_state())
      complete = latest is not None and latest >= config.total_steps
      if is_main:  # only now, the config checked against the workdir's checkpoints too
        workdir_lib.write_config(workdir, config)
        workdir_lib.write_labels(workdir, evaluate.source_class_names(config, train_source))
      if not complete:
        run_setup.print_start_lines(config, mesh, setup.abstract_state.params)
      writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
      if latest is not None:
        state, loader_state = restored
        loader.set_state(loader_state)
        if complete:  # nothing to train: one line, the workdir left as it is
          if is_main:
            past = '' if latest == config.total_steps else f', past total_steps={config.total_steps}'
            print(
              f'already complete at step {latest}{past}: checkpoints in {checkpoints.directory}', flush=True
            )
          return state
        if is_main:
          print(f'resuming from step {latest} in {checkpoints.directory}', flush=True)
      else:
        state = setup.init_state()
        if config.init_from:
          variables, source_step = transfer.load(
            config, run_setup.model_variables(state.params, state.batch_stats)
          )
          state = state.replace(
            params=variables['params'],
            batch_stats=variables.get('batch_stats', {}),
            ema_params=None if state.ema_params is None else variables['params'],
          )
          state = jax.device_put(state, setup.state_sharding)
          if is_main:
            print(transfer.init_from_line(config, source_step), flush=True)
      start_step = int(state.step)
      if is_main:
        print(optim.param_overview(state.params), flush=True)
      writer.truncate_after(start_step)  # a killed run may have logged steps past its last checkpoint

      train_step = jit_train_step(setup)
      eval_step = jax.jit(evaluate.make_eval_step(eval_model, config.model.num_classes))
      state = _train_loop(
        config,
        workdir,
        mesh,
        state,
        train_step,
        eval_step,
        loader,
        val_source,
        checkpoints,
        writer,
        preemption,
        start_step,
        lock,
      )
  finally:
    if preemption is not None:
      preemption.restore()
    if loader is not None:
      loader.close()
    try:
      if checkpoints is not None:
        checkpoints.wait()
        checkpoints.close()
    finally:
      if writer is not None:
        writer.close()
      lock.release()
  if is_main:  # a finished run ends with its result, its best checkpoint and how to use it
    try:
      records = metrics_lib.read_metrics(workdir)
    except FileNotFoundError:  # nothing logged
      records = []
    closing = progress_lib.closing_lines(
      records, config.total_steps, num_classes, checkpoints.directory, workdir
    )
    for line in closing:
      print(line, flush=True)
  return state


def restore_newest_good(checkpoints, setup: run_setup.TrainSetup, loader_state):
  """((state, loader state), step) of the newest step that restores whole and matches its fingerprints, or
  (None, None) without checkpoints. A damaged step is reported in one line and set aside as
  `<step>.damaged` (renamed, never deleted: a newer save of that step needs the name), by process 0."""

  def set_aside(step, error):
    del error
    if jax.process_index() == 0:
      target = checkpoints.set_aside(step, 'damaged')
      print(f'set step {step} aside as {target}', flush=True)
    run_setup.sync_processes(f'set aside step {step}')
    if jax.process_index() != 0:
      checkpoints.manager.reload()

  return checkpoints.restore_newest_good(
    lambda step: restore_state(checkpoints, step, setup.abstract_state, setup.state_sharding, loader_state),
    on_damaged=set_aside,
  )


def _train_loop(
  config,
  workdir,
  mesh,
  state,
  train_step,
  eval_step,
  loader,
  val_source,
  checkpoints,
  writer,
  preemption,
  start_step,
  lock,
):
  total_steps = config.total_steps
  progress = progress_lib.Progress(total_steps, start_step)
  guard = DivergenceGuard(checkpoints, checkpoints.latest_step())
  previous = None  # (step, metrics) checked one step late: keeps dispatch asynchronous
  interval_start, interval_steps = time.perf_counter(), 0
  profiling = False

  def save(step, eval_metrics=None):
    lock.check()  # never write into a workdir another job has taken over
    checkpoints.save(step, checkpoint_items(state, loader.get_state()), metrics=eval_metrics)
    writer.sync()  # on object storage metrics.jsonl and the events are uploaded whole, here at the latest
    guard.saved(step)

  if start_step < total_steps and preemption.stop_after(start_step):  # SIGTERM while the run started up
    if jax.process_index() == 0:
      print(
        f'SIGTERM before step {start_step + 1}: nothing was trained; run the same command again to start',
        flush=True,
      )
    return state
  for step in range(start_step, total_steps):
    if step == config.profile.start_step:
      profiling_lib.start_trace(workdir)  # WORKDIR/profile, through a local folder for gs://
      profiling = True
    batch = sharding.global_batch(next(loader), mesh)
    state, step_metrics = train_step(state, batch)
    done = step + 1
    interval_steps += 1
    if previous is not None:
      guard.check(*previous)
    previous = (done, step_metrics)
    checkpoints.check_for_errors()  # an asynchronous save that failed: one line at this step boundary
    lock.check()
    if profiling and done == config.profile.start_step + config.profile.num_steps:
      jax.block_until_ready(state)
      profiling_lib.stop_trace()
      profiling = False

    final = done == total_steps
    stop = preemption.stop_after(done)  # the same answer on every process
    if done % config.log.every_steps == 0 or final:
      guard.check(*previous)
      elapsed = time.perf_counter() - interval_start
      record = {key: float(value) for key, value in jax.device_get(step_metrics).items()}
      record['step_time_s'] = elapsed / interval_steps
      record['images_per_s'] = config.batch_size * interval_steps / elapsed
      writer.write(done, 'train', record)
      if jax.process_index() == 0:
        print(progress.line(done, record), flush=True)
      interval_start, interval_steps = time.perf_counter(), 0

    if done % config.eval.every_steps == 0 or final:
      guard.check(*previous)
      results = evaluate.evaluate_state(
        config, eval_step, state, val_source, mesh, workdir=workdir, step=done
      )
      for weights, result in results.items():
        writer.write(done, 'eval', {**result, 'weights': weights})
        if jax.process_index() == 0:
          print(f'eval step {done} ({weights} weights): {evaluate.result_text(config, result)}', flush=True)
      save(done, {'top1': max(result['top1'] for result in results.values())})
      interval_start = time.perf_counter()  # evaluation time is not training speed
    elif done % config.checkpoint.every_steps == 0 or stop:
      guard.check(*previous)
      save(done)

    if stop and not final:
      checkpoints.wait()
      print(  # one line, by every process: each one stopped (the multi-host launcher shows each)
        f'preempted: saved step {done}; run the same command again to resume (checkpoints in '
        f'{checkpoints.directory})',
        flush=True,
      )
      break
  if profiling:
    profiling_lib.stop_trace()
  return state
