"""`export --format onnx`: the .onnx file, run in onnxruntime, gives the run's embeddings (image + flip, unit norm)
for LoRA (merged into the kernels) and DA-LoRA (router and per-image mixing in the graph), for any batch size."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from conftest import TINY_RUN

from adaptface_jax import embeddings, export, run_state, verification
from adaptface_jax.models import face_model

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(tmp_path_factory, adapter: str) -> Path:
  """The workdir of a finished 2-step tiny run; a large learning rate makes the adapters matter."""
  from adaptface_jax import train
  from configs import common
  config = common.experiment("dino", adapter, "demo,tiny,steps=2")
  config.update_from_flattened_dict({**TINY_RUN, "eval.benchmarks": (), "optim.lr": 0.05})
  workdir = tmp_path_factory.mktemp(adapter) / "run"
  train.train_and_evaluate(config, str(workdir))
  return workdir


def jax_embeddings(model, variables, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(unit embeddings as verification computes them, routing weights) of the run's own JAX forward."""
  raw, raw_flip, weights = embeddings.make_embed_fn(model)(variables, faces, np.full(len(faces), -1, np.int32))
  return verification.strict_l2_normalize(np.asarray(raw) + np.asarray(raw_flip)), np.asarray(weights)


def onnx_embeddings(path: Path, faces: np.ndarray) -> np.ndarray:
  runner = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  (faces_input,) = runner.get_inputs()
  assert faces_input.name == "faces" and faces_input.type == "tensor(uint8)"
  assert isinstance(faces_input.shape[0], str) and faces_input.shape[1:] == [112, 112, 3]  # a dynamic batch
  return runner.run(None, {faces_input.name: faces})[0]


def faces(n: int = 5) -> np.ndarray:
  return np.random.RandomState(0).randint(0, 256, (n, 112, 112, 3)).astype(np.uint8)


def check_against_jax(workdir: Path, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  _, model, variables, _ = run_state.load_run(str(workdir))
  variables, _ = face_model.split_margin(variables)
  batch = faces()
  ours, weights = jax_embeddings(model, variables, batch)
  theirs = onnx_embeddings(path, batch)
  assert theirs.shape == (len(batch), model.embedding_dim) and theirs.dtype == np.float32
  print(f"{workdir.parent.name}: max |onnx - jax| = {np.abs(theirs - ours).max():.2e}")
  assert np.abs(theirs - ours).max() < 1e-4
  np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)
  return batch, theirs, weights


def test_lora_is_merged_and_exported_from_the_command_line(tmp_path_factory, cache_dir):
  workdir = tiny_run(tmp_path_factory, "lora")
  out = subprocess.run([sys.executable, "-m", "adaptface_jax.export", f"--workdir={workdir}", "--format=onnx"],
                       cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  path = workdir / "export" / "model.onnx"
  assert out.stdout.strip() == str(path)
  check_against_jax(workdir, path)
  import onnx
  graph = onnx.load(str(path)).graph
  assert not any("lora" in i.name for i in graph.initializer)  # merged: no rank-r factors left in the file


def test_dalora_routes_each_image_in_the_graph(tmp_path_factory, cache_dir):
  workdir = tiny_run(tmp_path_factory, "dalora")
  path = export.export_onnx(str(workdir), str(workdir / "dalora.onnx"))
  batch, theirs, weights = check_against_jax(workdir, path)
  assert np.ptp(weights, axis=0).max() > 1e-4  # the router gives the images different mixtures
  # Each image alone gets the embedding it gets in the batch: its mixture is its own.
  alone = np.concatenate([onnx_embeddings(path, batch[i:i + 1]) for i in range(len(batch))])
  assert np.abs(alone - theirs).max() < 1e-5
  # The routing matters: uniform weights give other embeddings, so the parity above checks the router in the graph.
  _, model, variables, _ = run_state.load_run(str(workdir))
  uniform, _ = jax_embeddings(model.clone(router_mode="uniform"), face_model.split_margin(variables)[0], batch)
  print(f"dalora: max |learned - uniform routing| = {np.abs(uniform - theirs).max():.2e}")
  assert np.abs(uniform - theirs).max() > 1e-3


def test_hf_export_still_needs_an_output_directory(tmp_path):
  out = subprocess.run([sys.executable, "-m", "adaptface_jax.export", f"--workdir={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 1 and "--out" in out.stderr and "Traceback" not in out.stderr


def test_the_full_input_size_traces_with_a_dynamic_batch(cache_dir):
  """At the real configs' 224 px (no resize at 112 px, shrinking in the runs above) attention on CPU splits a concrete
  batch into groups; the symbolic batch of the export takes the ungrouped form, with the same result."""
  import jax
  import jax.numpy as jnp
  import jax2onnx

  from adaptface_jax import trainable_rules
  from configs import common
  config = common.experiment("dino", "dalora", "demo,tiny")
  config.update_from_flattened_dict({**TINY_RUN, "model.image_size": 224})
  model, state, frozen, _, _ = run_state.setup(config, 16, steps=1)
  rng = np.random.RandomState(0)
  variables = jax.tree.map(lambda v: v + 0.01 * rng.randn(*v.shape).astype(np.float32),  # adapters away from B = 0
                           face_model.split_margin(trainable_rules.merge(state.trainable, frozen))[0])
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("N, 112, 112, 3"), jnp.uint8)
  proto = jax2onnx.to_onnx(export.onnx_embed_fn(model, variables), [spec], input_names=["faces"])
  batch = faces(3)
  theirs = ort.InferenceSession(proto.SerializeToString()).run(None, {"faces": batch})[0]
  ours, _ = jax_embeddings(model, variables, batch)
  assert np.abs(theirs - ours).max() < 1e-4

