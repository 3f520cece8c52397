"""Data parallelism across devices, and the class head sharded over them.

`data_mesh()` puts every device on one "data" axis, and `shardings(mesh)` gives the placements that training,
evaluation and the benchmarks share: variables replicated, batches split; `put` places values there when the devices
span several processes.

The class centres margin/centers [D, C] grow with the identities (2M x 512 float32 is 4 GiB, 12 GiB with AdamW's two
moments): `class_head` decides whether they are split along C over the devices of the mesh, and `state_shardings`
gives every leaf of a train state its placement: the centres and the optimizer moments at the same path along the
classes, the rest replicated. A sharded head is padded to a multiple of the device count (jit needs even shards);
the padding columns stay zero, get no logit, and are cut off again for checkpoints (`checkpoint_state`), which keep
the true shape [D, C] and so resume on any device count.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from adaptface_jax.losses import ClassHead

AXIS = "data"
CENTERS = ("margin", "centers")  # path (suffix) of the class centres in the trainable tree and in each AdamW moment
# config.centers.shard="auto" shards the head over a mesh of several devices once the centres and their two AdamW
# moments (float32) reach this size replicated: each device would hold all of it, and the step would all-reduce a
# gradient of the centres' size. Below it (CASIA's 10,572 x 512: 65 MiB) the head stays replicated, as before.
AUTO_SHARD_BYTES = 256 << 20


def data_mesh() -> Mesh:
  """All devices on one "data" axis."""
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
  """(replicated, batch): variables on every device, batches split along the "data" axis."""
  return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(AXIS))


def class_head(centers_config, mesh: Mesh, num_classes: int, embedding_dim: int) -> ClassHead:
  """The class head of a run (config.centers: shard "auto" | "on" | "off", sample_rate) on `mesh`."""
  shard = centers_config.get("shard", "auto") if centers_config is not None else "auto"
  rate = float(centers_config.get("sample_rate", 1.0)) if centers_config is not None else 1.0
  if shard not in ("auto", "on", "off"):
    raise ValueError(f"--config.centers.shard={shard!r}: expected auto, on or off")
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"--config.centers.sample_rate={rate}: expected a rate in (0, 1]")
  if shard == "auto":
    shard = "on" if mesh.size > 1 and 3 * 4 * embedding_dim * num_classes >= AUTO_SHARD_BYTES else "off"
  if shard == "off" or mesh.size == 1:
    return ClassHead(num_classes=num_classes, sample_rate=rate)
  return ClassHead(num_classes=num_classes, shards=mesh.size, sample_rate=rate,
                   logits_sharding=NamedSharding(mesh, PartitionSpec(None, AXIS)))


def _is_centers(path) -> bool:
  keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path[-len(CENTERS):])
  return keys == CENTERS


def _map_centers(fn, tree):
  return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(leaf) if _is_centers(path) else leaf, tree)


def padded_classes(head: ClassHead) -> int:
  return math.ceil(head.num_classes / head.shards) * head.shards


def pad_centers(tree, head: ClassHead):
  """The centres (and their moments) of a tree with the true number of classes, padded with zero columns for
  `head`: zero centres with zero moments get a zero gradient and a zero update, so they stay zero."""
  pad = padded_classes(head) - head.num_classes
  return _map_centers(lambda leaf: jnp.pad(leaf, ((0, 0), (0, pad))) if pad else leaf, tree)


def state_shardings(state, mesh: Mesh, head: ClassHead):
  """Per leaf of `state` (a TrainState, or any tree with the centres at margin/centers): the centres and the
  optimizer moments of the same path split along the classes when `head` is sharded, every other leaf
  replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  by_class = NamedSharding(mesh, PartitionSpec(None, AXIS)) if head.shards > 1 else replicated
  return jax.tree_util.tree_map_with_path(lambda path, _: by_class if _is_centers(path) else replicated, state)


def place_state(state, mesh: Mesh, head: ClassHead):
  """A train state (true number of classes, as set up or restored) padded for `head` and placed on `mesh`."""
  state = pad_centers(state, head)
  return put(state, state_shardings(state, mesh, head))


def checkpoint_state(state, mesh: Mesh, head: ClassHead):
  """The state to save: the centres and moments cut back to the true number of classes. The cut [D, C] is split
  along D when the devices divide it (C itself may not), else replicated; other leaves are passed through."""
  if padded_classes(head) == head.num_classes:
    return state
  dim = next(leaf.shape[0] for path, leaf in jax.tree_util.tree_leaves_with_path(state) if _is_centers(path))
  by_dim = NamedSharding(mesh, PartitionSpec(AXIS, None) if dim % mesh.size == 0 else PartitionSpec())
  cut = jax.jit(lambda tree: _map_centers(lambda leaf: leaf[:, :head.num_classes], tree),
                out_shardings=_map_centers(lambda _: by_dim, state_shardings(state, mesh, head)))
  return cut(state)


def put(tree, sharding):
  """jax.device_put that also reaches the devices of other processes: a leaf of numpy or of this process's arrays,
  holding the same values in every process, becomes one global array on `sharding` (one for all leaves, or a tree
  of them; device_put refuses a committed process-local array there); a leaf that is global already is resharded at
  most."""
  if isinstance(sharding, NamedSharding):
    if sharding.is_fully_addressable:
      return jax.device_put(tree, sharding)
    sharding = jax.tree.map(lambda _: sharding, tree)
  elif all(s.is_fully_addressable for s in jax.tree.leaves(sharding)):
    return jax.device_put(tree, sharding)

  def put_leaf(leaf, leaf_sharding):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return jax.device_put(leaf, leaf_sharding)
    leaf = np.asarray(leaf)
    return jax.make_array_from_callback(leaf.shape, leaf_sharding, lambda index: leaf[index])

  return jax.tree.map(put_leaf, tree, sharding)
