"""Running on a JAX mesh with axes ("data", "model"): parameters, batches and KV caches.

Parameters are split Megatron-style over "model" by one declarative rule table per
family (`models.*.SHARDING_RULES`: a regex on the parameter path -> one mesh axis or None
per dimension); a dimension that does not divide its axis is replicated and the plan says
so. Batches and KV caches are split over "data" (KV heads over "model"); a batch that
does not divide "data" is padded with copies of its last row, which are dropped from
the results.

Both Explicit meshes (`jax.make_mesh`'s default) and Auto meshes are accepted. The
library's programs run on the same devices with Auto axes: parameters, batch and cache
get the NamedShardings above and XLA's partitioner places every intermediate, so the
model code stays free of sharding annotations.

Multi-process: call `jax.distributed.initialize()` first, build the mesh over
`jax.devices()` (all processes) and run the same script everywhere; every process
passes the whole batch, and every process gets the whole result.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")
Rule = tuple[
    str, tuple[str | None, ...]
]  # (regex matched against "a.b.0.kernel", an axis or None per dim)


def check_mesh(mesh: Any, name: str = "mesh") -> Mesh:
    """`mesh` must be a concrete jax Mesh with exactly the axes ("data", "model")."""
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"{name} must be a jax.sharding.Mesh with axes {AXES} (e.g. jax.make_mesh((2, 4), {AXES})), "
            f"got {type(mesh).__name__}"
        )
    names = tuple(mesh.axis_names)
    missing = [a for a in AXES if a not in names]
    extra = [a for a in names if a not in AXES]
    if missing or extra:
        raise ValueError(
            f"{name} has axes {dict(mesh.shape)}; zspa_jax needs exactly {AXES}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unknown {extra}: name them 'data' or 'model')" if extra else "")
        )
    return mesh


def program_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axes with Auto axis types (what the library's programs run under)."""
    mesh = check_mesh(mesh)
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def parse_mesh_shape(text: str) -> dict[str, int]:
    """ "data=2,model=4" -> {"data": 2, "model": 4} (a missing axis has size 1)."""
    sizes = {a: 1 for a in AXES}
    for part in str(text).split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in AXES or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"mesh must look like 'data=D,model=M' with positive sizes, got {text!r}"
            )
        sizes[key] = int(value)
    return sizes


def device_mesh(data: int, model: int, what: str) -> Mesh:
    """`jax.make_mesh((data, model), AXES)`, refused by name (`what`) when this process
    sees fewer devices than it needs."""
    needed, have = data * model, jax.device_count()
    if needed > have:
        raise ValueError(f"{what} needs {needed} devices, this process sees {have}")
    return jax.make_mesh((data, model), AXES)


# ----------------------------------------------------------------------- parameter plan


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Where each parameter lives: `specs[path]` is its PartitionSpec; `replicated` names
    the dimensions a rule wanted split but that do not divide their axis."""

    specs: dict[str, P]
    replicated: tuple[str, ...]


def plan_params(
    shapes: dict[str, tuple[int, ...]], rules: Sequence[Rule], axis_sizes: dict[str, int]
) -> ShardingPlan:
    """Apply a family's rule table to {path: shape}; the first matching rule wins, a path
    no rule matches (norms, row-split biases, small embeddings) is replicated."""
    compiled = [(re.compile(pattern), axes) for pattern, axes in rules]
    specs, replicated = {}, []
    for path, shape in shapes.items():
        axes = next((axes for pattern, axes in compiled if pattern.fullmatch(path)), ())
        if axes and len(axes) != len(shape):
            raise ValueError(
                f"sharding rule for {path} names {len(axes)} dimensions; the parameter has shape {shape}"
            )
        spec = []
        for dim, axis in enumerate(axes):
            if axis is not None and shape[dim] % axis_sizes[axis]:
                replicated.append(
                    f"{path} dim {dim} ({shape[dim]}) does not divide {axis}={axis_sizes[axis]}: replicated"
                )
                axis = None
            spec.append(axis)
        specs[path] = P(*spec)
    return ShardingPlan(specs, tuple(replicated))


def check_model_axis(
    plan: ShardingPlan, axis_sizes: dict[str, int], mesh_name: str = "mesh"
) -> None:
    """A "model" axis > 1 that splits no parameter would only replicate work: refuse it."""
    size = axis_sizes["model"]
    if size > 1 and not any("model" in spec for spec in plan.specs.values()):
        raise ValueError(
            f"{mesh_name} axis 'model' has size {size}, which divides no parameter dimension of this model; "
            "use a size that divides the attention heads and MLP width (or model=1)"
        )


def bytes_per_device(
    shapes: dict[str, tuple[int, ...]],
    itemsize: dict[str, int],
    plan: ShardingPlan,
    axis_sizes: dict[str, int],
) -> int:
    """Largest per-device parameter bytes under `plan` (every device holds the same amount)."""
    total = 0
    for path, shape in shapes.items():
        split = int(np.prod([axis_sizes[a] for a in plan.specs[path] if a is not None] or [1]))
        total += int(np.prod(shape)) * itemsize[path] // split
    return total


def param_shardings(mesh: Mesh, plan: ShardingPlan) -> dict[str, NamedSharding]:
    return {path: NamedSharding(mesh, spec) for path, spec in plan.specs.items()}


# ------------------------------------------------------------------- batches and caches


def data_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape["data"])


def padded_rows(rows: int, mesh: Mesh | None) -> int:
    """Rows after padding to a multiple of the "data" axis."""
    d = data_size(mesh)
    return -(-rows // d) * d


def _divisible_spec(shape: Sequence[int], axes: Sequence[Any], sizes: dict[str, int]) -> P:
    spec = []
    for dim, axis in zip(shape, axes):
        if isinstance(axis, str) and dim % sizes[axis]:
            axis = None
        spec.append(axis)
    return P(*spec)


def place(array: Any, mesh: Mesh | None, *axes) -> Any:
    """Host array -> a global jax.Array on `mesh` with `axes` per leading dimension (dims
    that do not divide are replicated). Every process passes the whole array."""
    if array is None or mesh is None:
        return array
    host = np.asarray(array)
    sharding = NamedSharding(mesh, _divisible_spec(host.shape, axes, dict(mesh.shape)))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_tree(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of a pytree replicated on `mesh` (host-computed layouts and positions)."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: place(x, mesh), tree)


def constrain(x: jax.Array, *axes) -> jax.Array:
    """Inside a program: pin `x`'s leading dims to `axes` on the context mesh (others left to
    the partitioner). No-op without a mesh, and for dims that do not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names):
        return x
    axes = tuple(axes) + (P.UNCONSTRAINED,) * (x.ndim - len(axes))
    return jax.lax.with_sharding_constraint(x, _divisible_spec(x.shape, axes, dict(mesh.shape)))


def fetch(x: Any) -> np.ndarray:
    """A (possibly multi-process) jax.Array as a whole host array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def place_key(key: jax.Array, mesh: Mesh | None) -> jax.Array:
    """A jax.random key replicated on `mesh` (as a global array every process can pass)."""
    if mesh is None:
        return key
    data = place(np.asarray(jax.random.key_data(key)), mesh)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def constrain_cache(cache: Any) -> Any:
    """KV arrays [B, S, heads, head_dim]: batch over "data", KV heads over "model"."""
    return jax.tree.map(lambda x: constrain(x, "data", None, "model"), cache)


def mesh_context(mesh: Mesh | None):
    """`jax.set_mesh(mesh)` for the library's programs, or a no-op context without a mesh."""
    import contextlib

    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
