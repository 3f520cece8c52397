"""Data parallelism across devices: `data_mesh()` puts every device on one "data" axis, and `shardings(mesh)` gives
the placements that training, evaluation and the benchmarks share: variables replicated, batches split; `put`
places values there when the devices span several processes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh() -> Mesh:
  """All devices on one "data" axis."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
  """(replicated, batch): variables on every device, batches split along the "data" axis."""
  return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def put(tree, sharding: NamedSharding):
  """jax.device_put that also reaches the devices of other processes: a leaf of numpy or of this process's arrays,
  holding the same values in every process, becomes one global array on `sharding` (device_put refuses a
  committed process-local array there); a leaf that is global already is resharded at most."""
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def put_leaf(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return jax.device_put(leaf, sharding)
    leaf = np.asarray(leaf)
    return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

  return jax.tree.map(put_leaf, tree)
