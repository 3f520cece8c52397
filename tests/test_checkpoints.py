"""Checkpoints check themselves on resume: a damaged newest one is reported in one line, set aside (never deleted),
and the run resumes from the previous one; a finished run is left as it is."""

import json
import logging
import os
import shutil

import pytest

from adaptface_jax import checkpoints, run_state, train


def _largest_data_file(step_dir):
  return max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


def flip_bytes(step_dir):
  path = _largest_data_file(step_dir)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  path.write_bytes(bytes(data))


def truncate(step_dir):
  path = _largest_data_file(step_dir)
  os.truncate(path, path.stat().st_size // 2)


def delete_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()


# damage -> what the report says is wrong
DAMAGES = {flip_bytes: "differ from the sha256 recorded", truncate: "OUT_OF_RANGE",
           delete_metadata: "_METADATA) does not exist"}


def _copy(finished_run, tmp_path):
  source, config = finished_run
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  return workdir, config


def _our_warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("adaptface")]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_damaged_newest_checkpoint_is_reported_set_aside_and_trained_again(tmp_path, finished_run, caplog, damage):
  workdir, config = _copy(finished_run, tmp_path)
  newest = workdir / "checkpoints" / "last" / "4"
  saved_sha256 = json.loads((newest / "meta" / "metadata").read_text())["state_sha256"]
  damage(newest)

  caplog.set_level(logging.INFO, logger="adaptface_jax")
  train.train_and_evaluate(config, str(workdir))
  [line] = _our_warnings(caplog)
  moved = list((workdir / "checkpoints" / "damaged").iterdir())
  assert len(moved) == 1 and moved[0].name.startswith("4-")
  assert line.startswith(f"checkpoint step 4 at {newest} is damaged: ") and DAMAGES[damage] in line, line
  assert line.endswith(f"; moved it to {moved[0]}, resuming from step 2") and "\n" not in line
  assert "resumed from step 2" in caplog.text
  # Steps 3 and 4 trained again, bit for bit, and the run finished.
  assert json.loads((newest / "meta" / "metadata").read_text())["state_sha256"] == saved_sha256
  assert json.loads((workdir / "summary.json").read_text())["steps"] == 4
  assert json.loads((workdir / "results.json").read_text())["step"] == 4


@pytest.fixture(scope="module")
def target(finished_run):
  """(the run's initial state: the structure to restore into, the fingerprint of its frozen weights)."""
  _, config = finished_run
  _, state, frozen, _, _ = run_state.setup(config, num_classes=16, steps=4)  # the tiny world's 16 identities
  return state, checkpoints.fingerprint(frozen)


def test_no_usable_checkpoint_is_an_error_that_moves_nothing(tmp_path, finished_run, target):
  workdir, _ = _copy(finished_run, tmp_path)
  last = workdir / "checkpoints" / "last"
  for step in ("2", "4"):
    delete_metadata(last / step)
  state, frozen_fingerprint = target
  manager = checkpoints.Checkpoints(workdir / "checkpoints")
  with pytest.raises(checkpoints.DamagedCheckpoint, match="no checkpoint in .* is usable") as error:
    manager.restore_latest(state, expected_fingerprint=frozen_fingerprint)
  assert f"step 4 at {last / '4'}" in str(error.value) and f"step 2 at {last / '2'}" in str(error.value)
  assert (last / "2").is_dir() and (last / "4").is_dir() and not (workdir / "checkpoints" / "damaged").exists()


def test_another_trainable_tree_is_a_config_error_not_damage(tmp_path, finished_run, target):
  workdir, _ = _copy(finished_run, tmp_path)
  state, frozen_fingerprint = target
  centers = state.trainable["margin"]["centers"]
  other = state.replace(trainable={**state.trainable, "margin": {"centers": centers[:, :-1]}})  # one fewer class
  manager = checkpoints.Checkpoints(workdir / "checkpoints")
  with pytest.raises(ValueError, match="does not match this config's trainable tree.*trainable/margin/centers"):
    manager.restore_latest(other, expected_fingerprint=frozen_fingerprint)
  assert manager.restore_latest(state, expected_fingerprint=frozen_fingerprint) is not None
  assert not (workdir / "checkpoints" / "damaged").exists()


def test_rerunning_a_finished_run_changes_nothing(tmp_path, finished_run, caplog):
  workdir, config = _copy(finished_run, tmp_path)
  files = lambda: {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in workdir.rglob("*") if p.is_file()}
  before = files()
  caplog.set_level(logging.INFO, logger="adaptface_jax")
  assert train.train_and_evaluate(config, str(workdir)) == {}
  assert f"{workdir} is finished (step 4 of 4): nothing to do" in caplog.text
  assert files() == before
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["final_metrics"]
  # A run that ended between its final checkpoint and its summary gets the summary on rerun, nothing else changes.
  (workdir / "summary.json").unlink()
  del before[workdir / "summary.json"]
  assert train.train_and_evaluate(config, str(workdir)) == {}
  assert {p: v for p, v in files().items() if p.name != "summary.json"} == before
  rewritten = json.loads((workdir / "summary.json").read_text())
  assert rewritten["final_metrics"] == summary["final_metrics"]
  assert rewritten["steps"] == summary["steps"] and rewritten["trainable_params"] == summary["trainable_params"]


def test_evaluation_and_export_pass_over_a_damaged_newest_checkpoint(tmp_path, finished_run, caplog):
  """run_state.load_run, which evaluate, export and identify start from, takes the previous checkpoint as a resumed
  run does, but moves nothing; a damaged checkpoint asked for by step is refused with the step to pass instead."""
  workdir, _ = _copy(finished_run, tmp_path)
  last = workdir / "checkpoints" / "last"
  flip_bytes(last / "4")
  caplog.set_level(logging.INFO, logger="adaptface_jax")
  _, _, variables, meta = run_state.load_run(str(workdir))
  assert meta["step"] == 2 and "margin" in variables
  [line] = _our_warnings(caplog)
  assert line.startswith(f"checkpoint step 4 at {last / '4'} is damaged: ") and "previous checkpoint" in line, line
  assert (last / "4").is_dir() and not (workdir / "checkpoints" / "damaged").exists()
  with pytest.raises(checkpoints.DamagedCheckpoint, match="step 4 .* is damaged: .*; --step 2 names another"):
    run_state.load_run(str(workdir), step=4)


def test_a_save_that_a_peer_never_reaches_ends_as_one_error(tmp_path, finished_run, monkeypatch):
  """orbax's timeout on a barrier of a background save (a peer that never came) surfaces as a SaveFailed, one of the
  errors the command line prints as a paragraph."""
  from adaptface_jax import cli
  workdir, _ = _copy(finished_run, tmp_path)
  manager = checkpoints.Checkpoints(workdir / "checkpoints")

  def stuck():
    raise TimeoutError("Timed out while waiting for async_write_complete barrier.")

  monkeypatch.setattr(manager._last, "wait_until_finished", stuck)
  with pytest.raises(checkpoints.SaveFailed, match="did not complete: Timed out .* within 300 s") as error:
    manager.close()
  assert isinstance(error.value, cli.USER_ERRORS)
