"""config.init_from: a new run (step 0, fresh optimizer and schedule) whose trainable weights start from another run's
last checkpoint. LoRA -> LoRA takes every leaf, LoRA -> DA-LoRA starts each domain from the one adapter and keeps the
router's initialisation, another number of classes keeps its own centres; every other misfit is refused before
anything is written."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_config, tiny_run_args

from adaptface_jax import run_state, train, trainable_rules

ROOT = Path(__file__).resolve().parents[1]


def flat(tree) -> dict:
  return {k: np.asarray(v) for k, v in trainable_rules.flatten(tree).items()}


@pytest.fixture(scope="module")
def source(finished_run):
  """(workdir, trainable leaves at its last checkpoint) of the finished 4-step LoRA run."""
  workdir, _ = finished_run
  config, _, variables, meta = run_state.load_run(str(workdir))
  assert meta["step"] == 4
  return workdir, flat(trainable_rules.split(variables, config.trainable)[0])


def fresh_run(arg: str, num_classes: int = 16):
  """(config, initial state, frozen tree, optimizer) of a new run of the tiny config `arg` (the tiny world has 16
  identities)."""
  config = tiny_config(arg)
  _, state, frozen, tx, _ = run_state.setup(config, num_classes, steps=4)
  return config, state, frozen, tx


@pytest.fixture(scope="module")
def lora():
  return fresh_run("demo,tiny,steps=4")


def test_a_new_run_starts_from_the_source_weights_with_a_fresh_optimizer(source, lora, caplog):
  workdir, theirs = source
  config, fresh, frozen, tx = lora
  caplog.set_level(logging.INFO, logger="adaptface_jax")
  state = run_state.init_from_run(fresh, frozen, config, str(workdir), tx=tx)
  ours, initial = flat(state.trainable), flat(fresh.trainable)
  assert ours.keys() == theirs.keys()
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  assert not np.array_equal(theirs["lora/backbone/blocks_0/qkv/lora_b"], initial["lora/backbone/blocks_0/qkv/lora_b"])
  assert int(state.step) == 0 and np.array_equal(state.rng, fresh.rng)
  assert all(not np.asarray(leaf).any() for leaf in jax.tree.leaves(state.opt_state))  # count 0, zero moments
  assert f"{len(ours)} of {len(ours)} trainable leaves initialised from {workdir} (step 4)" in caplog.text
  assert "kept their own initialisation: none" in caplog.text


def test_lora_to_dalora_starts_every_domain_from_the_one_adapter(source, caplog):
  """On a training set of 10 identities: the source's 16 class centres do not fit, the new ones are kept."""
  workdir, theirs = source
  config, fresh, frozen, tx = fresh_run("demo,tiny,domains=3,steps=4", num_classes=10)
  caplog.set_level(logging.INFO, logger="adaptface_jax")
  state = run_state.init_from_run(fresh, frozen, config, str(workdir), tx=tx)
  ours, initial = flat(state.trainable), flat(fresh.trainable)
  lora = [key for key in ours if key.startswith("lora/")]
  router = [key for key in ours if key.startswith("params/router/")]
  assert len(lora) == 8 and len(router) == 4
  for key in lora:
    assert ours[key].shape[0] == 3 and theirs[key].shape[0] == 1
    for domain in range(3):
      np.testing.assert_array_equal(ours[key][domain], theirs[key][0], err_msg=f"{key}[{domain}]")
  for key in router + ["margin/centers"]:  # the router has no counterpart in plain LoRA
    np.testing.assert_array_equal(ours[key], initial[key], err_msg=key)
  for key in ours.keys() - set(lora) - set(router) - {"margin/centers"}:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  assert (f"{len(ours) - 5} of {len(ours)} trainable leaves initialised from {workdir} (step 4), 8 LoRA leaves "
          "copied into each of 3 domains") in caplog.text
  shown = caplog.text.split("kept their own initialisation: ")[1].splitlines()[0]
  assert shown == ", ".join(["margin/centers ([512, 16] there, [512, 10] here)", *router])


def test_dalora_to_lora_is_refused(tmp_path, lora):
  config, state, frozen, _ = lora
  dalora = tmp_path / "dalora"
  dalora.mkdir()
  (dalora / "config.json").write_text(tiny_config("demo,tiny,domains=3").to_json_best_effort())
  with pytest.raises(ValueError, match="that run is DA-LoRA with 3 domain adapters, this config plain LoRA "
                                       r"\(adapter.num_domains=1\); DA-LoRA -> LoRA is not supported"):
    run_state.init_from_run(state, frozen, config, str(dalora))


def test_another_backbone_is_refused_naming_both(source, lora):
  _, state, frozen, _ = lora
  config = tiny_config("demo,tiny,steps=4", {"model.backbone": "tiny-clip"})  # refused on the configs alone
  with pytest.raises(ValueError, match=r"adapted the backbone tiny-dinov2 \(random init\), this config loads "
                                       r"tiny-clip \(random init\)"):
    run_state.init_from_run(state, frozen, config, str(source[0]))


def test_a_source_without_checkpoints_is_not_found(tmp_path, source, lora):
  config, state, frozen, _ = lora
  with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path))}/nowhere is not a training workdir"):
    run_state.init_from_run(state, frozen, config, str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  shutil.copy(source[0] / "config.json", tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path))}/empty has no checkpoint"):
    run_state.init_from_run(state, frozen, config, str(tmp_path / "empty"))


# override -> what the refusal says
REFUSED = {
    "rank": ({"adapter.rank": 2, "adapter.alpha": 2.0},
             r"leaves of that run do not fit this config \(another adapter rank.*lora_a: "
             r"\[1, 64, 16\] there, \[1, 64, 2\] here"),
    "seed": ({"seed": 7}, r"that run's frozen weights \(backbone tiny-dinov2 \(random init\)\) differ from this "
                          r"config's \(backbone tiny-dinov2 \(random init\)\): another seed"),
    "itself": ({"init_from": "{tmp}/new"}, r"init_from={tmp}/new is this run's own --workdir"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_init_from_writes_nothing(tmp_path, source, case):
  overrides, message = REFUSED[case]
  overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
  config = tiny_config("demo,tiny,steps=4", {"eval.benchmarks": (), "init_from": str(source[0]), **overrides})
  with pytest.raises(ValueError, match=message.format(tmp=re.escape(str(tmp_path)))):
    train.train_and_evaluate(config, str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()


def test_a_workdir_with_checkpoints_resumes_without_init_from(tmp_path, source, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(source[0], workdir)
  config = tiny_config("demo,tiny,steps=4", {"checkpoint_every": 2, "eval.benchmarks": ("synth_lfw",),
                                             "init_from": "/nowhere"})
  caplog.set_level(logging.INFO, logger="adaptface_jax")
  assert train.train_and_evaluate(config, str(workdir)) == {}  # finished: left as it is, /nowhere never read
  assert "is finished (step 4 of 4): nothing to do" in caplog.text


def test_fine_tune_from_the_command_line(tmp_path, cache_dir, source):
  """LoRA -> DA-LoRA as a user types it; the new run trains its 2 steps from step 0 and finishes."""
  workdir, _ = source
  new = tmp_path / "dalora"
  cmd = [sys.executable, "-m", "adaptface_jax.main", "--config=configs/dalora_dino.py:demo,tiny,steps=2",
         f"--workdir={new}", *tiny_run_args(**{"eval.benchmarks": "()"}), f"--config.init_from={workdir}"]
  env = dict(os.environ, ADAPTFACE_CACHE=str(cache_dir))
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"initialised from {workdir} (step 4), 8 LoRA leaves copied into each of 3 domains" in out.stderr
  assert json.loads((new / "config.json").read_text())["init_from"] == str(workdir)
  assert [json.loads(line)["step"] for line in (new / "metrics.jsonl").read_text().splitlines()] == [1, 2]
  assert json.loads((new / "summary.json").read_text())["steps"] == 2
