"""Two processes on this host train and evaluate as one run (`main --multihost` with an explicit coordinator): with
a checkpoint and a best checkpoint saved at every evaluation they end with the parameters of a one-process run of
the same global batch; when one of them is killed, the other ends within the peer timeout with a message that says
how to resume, and rerunning both resumes to the uninterrupted run's parameters; `evaluate --multihost` scores the
run over two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, tiny_run_args

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # per phase; a tiny run takes 1-3 minutes on 2 busy cores
STEPS = 6
EVERY = 2  # evaluations, last and best checkpoints at steps 2, 4 and 6
PEER_TIMEOUT_S = 10
pytestmark = pytest.mark.xdist_group("multiprocess")  # the tests share the runs of `two_process_run`


def _start(workdir, cache_dir, cpu_devices, *extra, log: Path, command=None):
  """A training run (or `command`: a module and its flags) in a subprocess."""
  # Both runs shard the batch over 2 devices in all, so that they reduce over the same split.
  env = dict(os.environ, ADAPTFACE_CACHE=str(cache_dir), ADAPTFACE_CPU_DEVICES=str(cpu_devices), JAX_PLATFORMS="cpu")
  args = tiny_run_args(**{"optim.lr": 0.05, "eval.every_steps": EVERY, "checkpoint_every": EVERY})
  command = command or ["adaptface_jax.main", f"--config=configs/lora_dino.py:demo,tiny,steps={STEPS}",
                        f"--workdir={workdir}", *args]
  cmd = [sys.executable, "-m", *command, *extra]
  # Output to a file, not a pipe: a process blocked on a full pipe that is not being read would stall its peer.
  with open(log, "w") as out:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _start_processes(workdir, cache_dir, logs, command=None):
  address = f"--coordinator_address=127.0.0.1:{free_port()}"
  return [_start(workdir, cache_dir, 1, "--multihost", address, "--num_processes=2", f"--process_id={index}",
                 f"--peer_timeout={PEER_TIMEOUT_S}", log=log, command=command) for index, log in enumerate(logs)]


def _finish(procs, logs):
  deadline = time.monotonic() + TIMEOUT_S
  for proc in procs:
    try:
      proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:  # e.g. waiting for a peer that died
      proc.kill()
      proc.wait()
  for index, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0, f"process {index} (rc {proc.returncode}):\n{log.read_text()[-3000:]}"


def _trainable(*workdirs):
  """(step, flat trainable tree) of each run's last checkpoint; the runs share a config, so one `setup` (the slow
  part of run_state.load_run) serves all."""
  import ml_collections

  from adaptface_jax import checkpoints, run_state, trainable_rules
  config = ml_collections.ConfigDict(json.loads((workdirs[0] / "config.json").read_text()))
  managers = [checkpoints.Checkpoints(workdir / "checkpoints") for workdir in workdirs]
  meta = managers[0].read_meta(managers[0].latest_step())
  _, state, frozen, _, _ = run_state.setup(config, meta["num_classes"], steps=meta["total_steps"])
  out = []
  for manager in managers:
    restored = manager.restore(state, expected_fingerprint=checkpoints.fingerprint(frozen))
    manager.close()
    out.append((int(restored.step), {k: np.asarray(v) for k, v in trainable_rules.flatten(restored.trainable).items()}))
  return out


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, cache_dir):
  """(one-process workdir, two-process workdir) of the same run."""
  tmp_path = tmp_path_factory.mktemp("multiprocess")
  multi, single = tmp_path / "multi", tmp_path / "single"
  # First the one-process run: it prepares the data once (the two processes would each generate it).
  _finish([_start(single, cache_dir, 2, log=tmp_path / "single.log")], [tmp_path / "single.log"])
  logs = [tmp_path / f"process{index}.log" for index in range(2)]
  _finish(_start_processes(multi, cache_dir, logs), logs)
  return single, multi


def test_two_processes_train_and_evaluate_like_one(two_process_run):
  single, multi = two_process_run
  results = json.loads((multi / "results.json").read_text())
  names = ("synth_lfw", "synth_cfp_fp", "synth_agedb")
  assert all(results[name]["num_pairs"] == 40 for name in names)
  assert json.loads((multi / "summary.json").read_text())["steps"] == STEPS
  lines = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines if "loss/total" in line] == list(range(1, STEPS + 1))  # process 0 writes
  assert [line["step"] for line in lines if "eval/synth_lfw" in line] == list(range(EVERY, STEPS + 1, EVERY))
  # Every evaluation saved last/ and best/ at once (the best step is one of them).
  assert sorted(int(p.name) for p in (multi / "checkpoints/last").iterdir()) == list(range(EVERY, STEPS + 1, EVERY))
  assert [int(p.name) for p in (multi / "checkpoints/best").iterdir()][0] in range(EVERY, STEPS + 1, EVERY)

  (step_single, a), (step_multi, b) = _trainable(single, multi)
  assert step_single == step_multi == STEPS
  assert all(np.abs(v).max() > 1e-3 for k, v in b.items() if k.endswith("lora_b"))  # trained from zero
  _assert_same(a, b)
  single_results = json.loads((single / "results.json").read_text())
  for name in names:
    assert abs(results[name]["accuracy"] - single_results[name]["accuracy"]) <= 1 / 40, name


def test_a_lost_peer_ends_the_run_with_a_way_to_resume(two_process_run, tmp_path, cache_dir):
  workdir = tmp_path / "run"
  logs = [tmp_path / f"process{index}.log" for index in range(2)]
  procs = _start_processes(workdir, cache_dir, logs)
  first = workdir / "checkpoints" / "last" / str(EVERY)
  deadline = time.monotonic() + TIMEOUT_S
  while not first.is_dir() and procs[0].poll() is None and time.monotonic() < deadline:
    time.sleep(0.1)
  assert first.is_dir(), logs[0].read_text()[-3000:]
  procs[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  try:
    procs[0].wait(timeout=PEER_TIMEOUT_S + 50)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail(f"the survivor did not end within {PEER_TIMEOUT_S + 50} s of its peer's death")
  waited = time.monotonic() - killed
  procs[1].wait()
  output = logs[0].read_text()
  assert procs[0].returncode == 1, output[-3000:]
  errors = [line for line in output.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, output[-3000:]
  error = errors[0]
  assert "lost process 1 of 2 after step" in error, error
  assert f"checkpoint is step {EVERY}" in error or f"checkpoint is step {2 * EVERY}" in error, error
  assert "--multihost" in error and f"--workdir={workdir}" in error, error
  for dump in ("Check failure", "*** ", "Fatal Python error", "Traceback"):  # no C++ or Python stack
    assert dump not in output, output[-3000:]
  assert waited < PEER_TIMEOUT_S + 40, waited

  logs = [tmp_path / f"rerun{index}.log" for index in range(2)]
  _finish(_start_processes(workdir, cache_dir, logs), logs)
  assert "resumed from step" in logs[0].read_text()
  (step_resumed, a), (step_whole, b) = _trainable(workdir, two_process_run[1])
  assert step_resumed == step_whole == STEPS
  _assert_same(a, b)

  # `evaluate --multihost` over the same two processes scores the run's last checkpoint as training did.
  logs = [tmp_path / f"evaluate{index}.log" for index in range(2)]
  _finish(_start_processes(workdir, cache_dir, logs, command=["adaptface_jax.evaluate", f"--workdir={workdir}"]),
          logs)
  evaluated = json.loads((workdir / f"eval_step{STEPS}" / "results.json").read_text())
  trained = json.loads((workdir / "results.json").read_text())
  for name in ("synth_lfw", "synth_cfp_fp", "synth_agedb"):
    assert evaluated[name]["num_pairs"] == 40 and evaluated[name]["accuracy"] == trained[name]["accuracy"], name
