"""Per-device memory of the compiled train step, replicated vs sharded class head, from XLA's buffer assignment.

  python launch/memory_table.py [--devices 8] [--batch 512] [--backbones vit_s14,vit_b16] [--full] [--json out.json]

Each cell compiles `train.jit_train_step` on a mesh of `--devices` CPU devices for ShapeDtypeStruct inputs of the
real shapes (LoRA rank 16 on qkv and proj, 224 px, 512-d embedding, AdamW), so nothing of the size of the head is
allocated, and reads `memory_analysis()`: arguments (state, frozen weights, batch), outputs, temporaries and their
total (the state is donated, so outputs that alias it are counted once). The numbers are XLA:CPU's; a GPU compile
fuses and schedules differently, so its temporaries differ, while the arguments and outputs (the weights, the
optimizer state, the head) are the same bytes.

A full ViT step at batch 512 takes minutes to compile on CPU, so by default the backbones are compiled with the
first training set only, and every other row adds the head's share: the same step on a 2-layer, 64-wide ViT
(`tiny-dinov2`, same batch, same 512-d head) with that row's identities, minus it with the first set's. `--full`
compiles every row with its backbone instead. docs/scale.md holds a table made by this script.
"""

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import jax
import jax.numpy as jnp

from adaptface_jax import optim, sharding, train, trainable_rules
from adaptface_jax.models import face_model, hf_weights
from adaptface_jax.run_state import TrainState

log = logging.getLogger(__name__)

BACKBONES = {"vit_s14": ("dino", "facebook/dinov2-small"), "vit_b16": ("clip", "openai/clip-vit-base-patch16")}
FACE_PX = 112  # the pipeline's aligned faces; the model resizes them to config.model.image_size (224) on device
DATASETS = {"CASIA-WebFace": 10_572, "MS1MV2": 85_742, "WebFace4M": 205_990, "WebFace42M": 2_059_906}


def abstract_setup(config, num_classes: int, steps: int = 1000):
  """run_state.setup's (model, state, frozen, tx, schedule) as shapes only: no weight is read or allocated."""
  vit = hf_weights.vit_config(hf_weights.read_architecture(config.model.backbone, random_init=True)[0])
  model = face_model.create_model(config, vit)
  variables = jax.eval_shape(lambda key: face_model.init_variables(model, key, num_classes), jax.random.PRNGKey(0))
  trainable, frozen = trainable_rules.split(variables, config.trainable)
  tx, schedule = optim.make_optimizer(config.optim, steps)
  state = jax.eval_shape(lambda t: TrainState(step=jnp.zeros((), jnp.int32), trainable=t, opt_state=tx.init(t),
                                              rng=jax.random.PRNGKey(0)), trainable)
  return model, state, frozen, tx, schedule


def compiled_step(config, num_classes: int, mesh, batch_size: int):
  """The train step compiled for `mesh` with the class head config.centers asks for, on abstract inputs."""
  model, state, frozen, tx, schedule = abstract_setup(config, num_classes)
  head = sharding.class_head(config.centers, mesh, num_classes, model.output_dim)
  state = jax.eval_shape(lambda s: sharding.pad_centers(s, head), state)
  state_sharding = sharding.state_shardings(state, mesh, head)
  batch = {"image": jax.ShapeDtypeStruct((batch_size, FACE_PX, FACE_PX, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
           "domain": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  step = train.jit_train_step(model, tx, schedule, config.loss, mesh, head, state_sharding)
  return step.lower(state, frozen, batch).compile()


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "temp": m.temp_size_in_bytes,
         "alias": m.alias_size_in_bytes}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def experiment_config(family: str, backbone: str, batch_size: int, shard: str):
  from configs import common
  config = common.base_config(family, "lora")
  config.model.backbone = backbone
  config.data.batch_size = batch_size
  config.centers.shard = shard
  return config


def cell(name: str, dataset: str, shard: str, mesh, batch: int) -> dict:
  family, backbone = BACKBONES[name] if name in BACKBONES else ("dino", name)
  start = time.perf_counter()
  config = experiment_config(family, backbone, batch, shard)
  out = memory(compiled_step(config, DATASETS[dataset], mesh, batch))
  log.info("%s %s %s: %.2f GiB (%.0f s)", name, dataset, shard, out["total"] / 2**30, time.perf_counter() - start)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch", type=int, default=512, help="global batch")
  parser.add_argument("--backbones", default=",".join(BACKBONES))
  parser.add_argument("--datasets", default=",".join(DATASETS))
  parser.add_argument("--full", action="store_true", help="compile every row with its backbone")
  parser.add_argument("--json", default="", help="also write the rows here")
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.devices)
  mesh = sharding.data_mesh()
  datasets = args.datasets.split(",")
  heads = {"off": "replicated", "on": "sharded"}
  share = {}  # (dataset, shard) -> the 2-layer ViT's step, for the head's share of each row
  if not args.full:
    share = {(d, s): cell("tiny-dinov2", d, s, mesh, args.batch) for d in datasets for s in heads}
  rows = []
  gib = lambda b: f"{b / 2**30:.2f}"
  print("| backbone | training set | identities | head | argument GiB | output GiB | temp GiB | total GiB | how |")
  print("|---|---|---:|---|---:|---:|---:|---:|---|")
  for name in args.backbones.split(","):
    measured = {}
    for dataset in datasets:
      for shard, head in heads.items():
        if args.full or dataset == datasets[0]:
          values, how = cell(name, dataset, shard, mesh, args.batch), "compiled"
          measured[shard] = values
        else:
          base, first, this = measured[shard], share[(datasets[0], shard)], share[(dataset, shard)]
          values, how = {k: base[k] + this[k] - first[k] for k in base}, f"{datasets[0]} + head share"
        row = dict(backbone=name, dataset=dataset, num_classes=DATASETS[dataset], head=head, devices=mesh.size,
                   batch=args.batch, how=how, **values)
        rows.append(row)
        print(f"| {name} | {dataset} | {row['num_classes']:,} | {head} | {gib(row['argument'])} | "
              f"{gib(row['output'])} | {gib(row['temp'])} | {gib(row['total'])} | {how} |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "head_share_steps": [dict(dataset=d, shard=s, **v) for (d, s), v in share.items()]},
                f, indent=2)


if __name__ == "__main__":
  main()
