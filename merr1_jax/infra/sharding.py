"""Meshes, shardings and multi-host set-up. Sharding is data: logical-axis rules come from the config.

The mesh always has the three axes ``('data', 'fsdp', 'tensor')``:
  * data:   pure data parallelism (parameters replicated);
  * fsdp:   data parallelism with parameters and optimizer state sharded along their 'embed' dimension;
  * tensor: Megatron-style model parallelism over heads, MLP width and vocabulary.
The batch is split over ('data', 'fsdp'). Which parameter dimension goes to which mesh axis is decided in two
steps, both data: the model's ``partition_rules()`` (parameter path regex -> logical axis names) and the
config's ``axis_rules`` (logical name -> mesh axes).

`BatchLayout` is the rollouts' view of the same mesh: prompt rows over the batch axes and KV-cache heads over
`tensor`, where the sampler and the scorer place and constrain their arrays.

Shape legend: B batch rows, L sequence positions. Every batch array is batch-major (rows on axis 0).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from merr1_jax.models import base

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. 'embed' on fsdp shards every matrix once (ZeRO-3 style); heads, MLP width and
# vocabulary go to tensor. Names not listed are replicated.
DEFAULT_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "heads": "tensor",
}


def mesh_shape_for(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 entry of a (data, fsdp, tensor) shape and checks the product against the devices."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape}: entries must be positive, with at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape} does not divide the {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise ValueError(
        f"mesh shape {shape} needs {int(np.prod(shape))} devices but {num_devices} are available "
        f"({jax.devices()[0].platform}); set mesh.shape to match, e.g. (-1, 1, 1)")
  return shape  # type: ignore[return-value]


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh.

  Built with ``jax.sharding.Mesh`` rather than ``jax.make_mesh``: in jax 0.10 the latter defaults to Explicit
  axis types, under which gathers fail with ShardingTypeError.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape_for(shape, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def param_shardings(model: base.PolicyModel, params: Any, mesh: Mesh,
                    axis_rules: Mapping[str, Any] = DEFAULT_AXIS_RULES) -> Any:
  """NamedSharding pytree for ``params`` (arrays or ShapeDtypeStructs)."""
  specs = base.param_partition_specs(params, model.partition_rules(), axis_rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def state_shardings(abstract_state: Any, params_sharding: Any, mesh: Mesh) -> Any:
  """Shardings for a whole train state (params, optimizer state, reference copy, counters).

  Optimizer moments and reference leaves are sharded like the parameter whose path they end with (optax nests
  parameter-shaped trees under its own keys, so the parameter path is a suffix of the leaf path); everything
  else (step counters, scalars) is replicated.
  """
  by_path = {base.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_sharding)[0]}
  shapes = {base.path_str(p): np.shape(x) for p, x in
            jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}
  rep = replicated(mesh)

  def pick(path, leaf):
    name = base.path_str(path)
    for pname, sh in by_path.items():
      if (name == pname or name.endswith("/" + pname)) and np.shape(leaf) == shapes[pname]:
        return sh
    return rep

  return jax.tree_util.tree_map_with_path(pick, abstract_state)


def batch_spec(leaf: Any) -> P:
  """Rows (axis 0) over ('data', 'fsdp'), every other dimension replicated."""
  return P(BATCH_AXES, *([None] * (np.ndim(leaf) - 1)))


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
  """Shardings for a batch pytree: every leaf is batch-major (positions too: [B, L] or [B, L, 3])."""
  return jax.tree.map(lambda leaf: NamedSharding(mesh, batch_spec(leaf)), batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global(local_batch: Any, shardings: Any) -> Any:
  """Assembles per-process host batches into global jax.Arrays (each process passes its own rows).

  On one process this is a device_put with the given shardings.
  """
  return jax.tree.map(
      lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), local_batch, shardings)


def pad_to_common_shape(local_batch: Any) -> Any:
  """Right-pads every leaf (with zeros) to the largest shape that any process holds, so that per-process rows
  bucketed to different lengths can form one global array. Only for right-padded, masked data (an SFT batch),
  where extra zero columns are padding like the others. A collective on several processes; a no-op on one."""
  if jax.process_count() == 1:
    return local_batch
  from jax.experimental import multihost_utils  # noqa: PLC0415
  leaves, treedef = jax.tree.flatten(local_batch)
  leaves = [np.asarray(x) for x in leaves]
  rank = max([x.ndim for x in leaves] + [1])
  shapes = np.asarray([list(x.shape) + [0] * (rank - x.ndim) for x in leaves], np.int64)
  want = np.asarray(multihost_utils.process_allgather(shapes)).max(axis=0)
  leaves = [np.pad(x, [(0, int(w) - n) for n, w in zip(x.shape, want[i])]) for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, leaves)


def from_global(batch: Any, shardings: Any) -> Any:
  """Places host values that every process holds in full (the same global batch everywhere) as global
  jax.Arrays: each process copies only the slices its own devices hold. No cross-process check or transfer,
  unlike a device_put onto devices of other processes."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
                      batch, shardings)


def _identity(x):
  return x


def to_host(tree: Any) -> Any:
  """jax.Arrays -> numpy with their full global value on every process (for host code such as decoding and
  rewards). Arrays spread over several processes are all-gathered, a collective that every process must join
  in the same order; anything else (one process, numpy) is a plain np.asarray."""
  leaves, treedef = jax.tree.flatten(tree)
  spread = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
  named = [i for i in spread if isinstance(leaves[i].sharding, NamedSharding)]
  if named:
    # One program replicates them all: one dispatch and one set of collectives, not one per leaf.
    full = jax.jit(_identity, out_shardings=[leaves[i].sharding.update(spec=P()) for i in named])(
        [leaves[i] for i in named])
    for i, x in zip(named, full):
      leaves[i] = x.addressable_data(0)
  if len(named) < len(spread):
    from jax.experimental import multihost_utils  # noqa: PLC0415
    for i in set(spread) - set(named):
      leaves[i] = multihost_utils.process_allgather(leaves[i], tiled=True)
  return jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])


# ----------------------------------------------------------------------------------------------------------
# The rollouts' layout


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """Batch over `batch` mesh axes (data/fsdp), KV heads over `kv_heads` (tensor) where the rules say so.

  Hashable: the sampler and the scorer take it as a static jit argument and constrain their intermediate
  arrays (caches, decode state) with it.
  """

  mesh: Mesh
  batch: tuple[str, ...]
  kv_heads: str | tuple[str, ...] | None

  @classmethod
  def make(cls, mesh: Mesh, axis_rules: Mapping[str, Any] | None = None) -> "BatchLayout":
    rules = dict(axis_rules or {})
    batch = rules.get("batch", tuple(a for a in BATCH_AXES if a in mesh.axis_names))
    return cls(mesh, (batch,) if isinstance(batch, str) else tuple(batch), rules.get("kv_heads"))

  @property
  def batch_size(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in self.batch]))

  def check_rows(self, rows: int) -> None:
    if rows % self.batch_size:
      raise ValueError(f"{rows} prompts do not split over the batch mesh axes {self.batch} "
                       f"({self.batch_size} shards); pad the batch to a multiple")

  def sharding(self, ndim: int, kv_axis: int | None = None) -> NamedSharding:
    spec: list[Any] = [None] * ndim
    spec[0] = self.batch or None
    if kv_axis is not None:
      spec[kv_axis] = self.kv_heads
    return NamedSharding(self.mesh, P(*spec))

  def place(self, tree: Any) -> Any:
    """Batch-major arrays -> global arrays over the batch axes (None leaves stay None).

    Host values are the whole global batch, the same on every process (the trainer's RL and eval batches are),
    and each process copies only its devices' rows; device arrays are resharded where they are.
    """
    def one(a):
      target = self.sharding(np.ndim(a))
      if isinstance(a, jax.Array):
        return jax.device_put(a, target)
      return from_global(np.asarray(a), target)

    return jax.tree.map(one, tree)

  def constrain(self, tree: Any) -> Any:
    """Inside jit: batch-major leaves sharded on axis 0, a KVCache's k/v also over kv heads (axis 3)."""
    batch = lambda a: jax.lax.with_sharding_constraint(a, self.sharding(a.ndim)) if a.ndim else a  # noqa: E731

    def one(x):
      if isinstance(x, base.KVCache):
        kv = lambda a: jax.lax.with_sharding_constraint(a, self.sharding(a.ndim, 3))  # noqa: E731
        return x.replace(k=kv(x.k), v=kv(x.v), valid=batch(x.valid), index=batch(x.index))
      return batch(x)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, base.KVCache))


def constrain(layout: BatchLayout | None, tree: Any) -> Any:
  """``layout.constrain(tree)``, or the tree itself without a layout (one device)."""
  return tree if layout is None else layout.constrain(tree)


# ----------------------------------------------------------------------------------------------------------
# Multi-host


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Starts jax.distributed when running on several hosts. Returns True when it did.

  Order of precedence:
    1. explicit arguments, then the environment (``MERR1_COORDINATOR``, ``MERR1_NUM_PROCESSES``,
       ``MERR1_PROCESS_ID``): ``jax.distributed.initialize(coordinator_address, num_processes, process_id)``;
    2. a cluster that JAX detects by itself: a TPU slice with several workers (``TPU_WORKER_HOSTNAMES`` lists more
       than one host), a multi-slice job (``MEGASCALE_COORDINATOR_ADDRESS``), SLURM with ``SLURM_NTASKS`` > 1 or
       Open MPI with ``OMPI_COMM_WORLD_SIZE`` > 1: ``jax.distributed.initialize()`` with no arguments;
    3. otherwise (one machine, one process) nothing is started.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("MERR1_COORDINATOR")
  if num_processes is None and "MERR1_NUM_PROCESSES" in env:
    num_processes = int(env["MERR1_NUM_PROCESSES"])
  if process_id is None and "MERR1_PROCESS_ID" in env:
    process_id = int(env["MERR1_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("an explicit coordinator needs num_processes and process_id (flags or MERR1_* env)")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
  tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  auto = (len(tpu_hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env
          or ("SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1)
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if auto:
    jax.distributed.initialize()  # JAX's cluster detection fills in the coordinator and ranks
    return True
  logging.info("single process: jax.distributed not initialised")
  return False
