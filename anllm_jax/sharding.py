"""Device mesh (axes data, fsdp, tensor), the logical-axis rules that turn parameter names into shardings, and the
processes: jax.distributed start-up, which batch rows a process feeds, and reading replicated values back.

The mesh is built from within-granule sizes (`ici_*`: one TPU slice or one GPU node) times across-granule sizes
(`dcn_*`: slices or nodes), so that the fast links carry the chatty axes. Parameters carry logical axis names
(model.py); `nnx.get_partition_spec` under `nnx.logical_axis_rules(rules)` maps them onto mesh axes.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from anllm_jax.config import DistributedConfig, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)


def resolve_shape(cfg: MeshConfig, n_devices: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(ici, dcn) sizes per mesh axis, with the one -1 among ici_* filled so that all sizes multiply to n_devices."""
    ici = [cfg.ici_data, cfg.ici_fsdp, cfg.ici_tensor]
    dcn = [cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor]
    names = [f"ici_{a}" for a in MESH_AXES] + [f"dcn_{a}" for a in MESH_AXES]
    for name, size in zip(names, ici + dcn, strict=True):
        if size == 0 or size < -1 or (size == -1 and name.startswith("dcn")):
            raise ValueError(f"mesh.{name}={size} must be a positive size (ici_* may also be -1 to fill)")
    if ici.count(-1) > 1:
        raise ValueError("mesh: at most one of ici_data, ici_fsdp, ici_tensor may be -1")
    fixed = math.prod(s for s in ici if s != -1) * math.prod(dcn)
    if -1 in ici:
        if n_devices % fixed:
            raise ValueError(
                f"mesh sizes {ici} x dcn {dcn} cannot fill {n_devices} devices: {n_devices} is not divisible by {fixed}"
            )
        ici[ici.index(-1)] = n_devices // fixed
    if math.prod(ici) * math.prod(dcn) != n_devices:
        raise ValueError(
            f"mesh ici {tuple(ici)} x dcn {tuple(dcn)} needs {math.prod(ici) * math.prod(dcn)} devices but "
            f"{n_devices} are available; make the sizes multiply to {n_devices} or set one ici_* to -1"
        )
    return tuple(ici), tuple(dcn)  # type: ignore[return-value]


def _granules(devices: list[Any], n: int) -> list[list[Any]]:
    """Split devices into `n` equal groups joined by the slow network: TPU slices, else consecutive processes."""
    if hasattr(devices[0], "slice_index") and len({d.slice_index for d in devices}) == n:
        groups: dict[int, list[Any]] = {}
        for d in devices:
            groups.setdefault(d.slice_index, []).append(d)
        return [groups[k] for k in sorted(groups)]
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    size = len(ordered) // n
    return [ordered[i * size : (i + 1) * size] for i in range(n)]


def make_mesh(cfg: MeshConfig, devices: list[Any] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes (data, fsdp, tensor) in GSPMD (Auto) mode."""
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = resolve_shape(cfg, len(devices))
    if math.prod(dcn) == 1:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        # Each granule is laid out with the topology-aware ici shape; granules tile the dcn grid, slow axis major.
        blocks = [
            mesh_utils.create_device_mesh(ici, g, allow_split_physical_axes=True)
            for g in _granules(devices, math.prod(dcn))
        ]
        grid = np.empty(tuple(i * d for i, d in zip(ici, dcn, strict=True)), dtype=object)
        for k, idx in enumerate(np.ndindex(*dcn)):
            grid[tuple(slice(i * s, (i + 1) * s) for i, s in zip(idx, ici, strict=True))] = blocks[k]
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def axis_rules(cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
    """The configured logical-axis rules in the form flax expects (lists of mesh axes become tuples)."""
    rules = []
    for name, target in cfg.logical_axis_rules:
        if isinstance(target, list | tuple):
            target = tuple(target)
        for axis in target if isinstance(target, tuple) else (target,):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(
                    f"mesh.logical_axis_rules: {name!r} maps to unknown mesh axis {axis!r}; use {MESH_AXES}"
                )
        rules.append((name, target))
    return tuple(rules)


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, name: str) -> PartitionSpec:
    """Drop mesh axes from dimensions they do not divide (e.g. 9 heads over tensor=2): that dimension replicates."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None)
        if axes is not None and dim % size:
            log.warning(
                "%s: dimension %d is not divisible by mesh axes %s (size %d); replicated", name, dim, axes, size
            )
            axes = None
        out.append(axes)
    return PartitionSpec(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """NamedSharding per parameter (a pure dict shaped like `nnx.to_pure_dict(abstract_state)`)."""
    with nnx.logical_axis_rules(rules):
        specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
    shapes = nnx.to_pure_dict(abstract_state)
    return jax.tree.map_with_path(
        lambda path, spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh, jax.tree_util.keystr(path))),
        specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_axes(rules: tuple[tuple[str, Any], ...]) -> Any:
    """The mesh axes the batch dimension is split over (logical axis 'batch')."""
    return dict(rules).get("batch", ("data", "fsdp"))


def batch_sharding(mesh: Mesh, rules: tuple[tuple[str, Any], ...]) -> NamedSharding:
    """Sharding of [B, T] input batches: rows split over the 'batch' rule's mesh axes."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(rules), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_rows(batch_sharding: NamedSharding, global_batch: int, seq_len: int) -> tuple[int, int]:
    """(block index, number of blocks): the contiguous block of batch rows this process's devices hold."""
    slices = batch_sharding.addressable_devices_indices_map((global_batch, seq_len)).values()
    starts = [s[0].start or 0 for s in slices]
    stops = [global_batch if s[0].stop is None else s[0].stop for s in slices]
    lo, hi = min(starts), max(stops)
    rows = hi - lo
    if sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops, strict=True)}) != rows or global_batch % rows:
        raise ValueError(
            "this mesh gives a process non-contiguous batch rows; put the process-spanning devices on the data/fsdp "
            "axes (mesh.dcn_* or the ici_* order)"
        )
    return lo // rows, global_batch // rows


def host_value(x: jax.Array) -> np.ndarray:
    """A replicated array as a host numpy array, on every process: each reads the copy on one of its own devices
    (a multi-process array is not fully addressable, and its local shards may live on several local devices)."""
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def host_to_global(host_tree: Any, shardings: Any) -> Any:
    """Host arrays (identical on every process) as global arrays with the given shardings: each process fills only
    the shards of its own devices."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]), host_tree, shardings
    )


def initialize_distributed(d: DistributedConfig) -> None:
    """jax.distributed from the config, else from JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, else
    auto-detected on SLURM (more than one task) and multi-host TPU VMs; single-process otherwise."""
    env = os.environ
    address = d.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num = d.num_processes if d.num_processes is not None else _int_env("JAX_NUM_PROCESSES")
    pid = d.process_id if d.process_id is not None else _int_env("JAX_PROCESS_ID")
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
    tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env
    if address or num is not None:
        if not (address and num is not None and pid is not None):
            raise ValueError(
                "distributed: set coordinator_address, num_processes and process_id together "
                "(config distributed.* or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID)"
            )
        if num > 1:
            jax.distributed.initialize(address, num, pid, initialization_timeout=d.initialization_timeout)
    elif slurm or tpu_pod:
        jax.distributed.initialize(initialization_timeout=d.initialization_timeout)


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)
