"""Two processes on this host train and evaluate as one run (`main --multihost` with an explicit coordinator), and
end with the parameters of a one-process run of the same global batch."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import tiny_run_args

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # per phase; a tiny run takes 2-3 minutes on 2 idle cores
STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, cache_dir, cpu_devices, *extra, log: Path):
  # Both runs shard the batch over 2 devices in all, so that they reduce over the same split.
  env = dict(os.environ, ADAPTFACE_CACHE=str(cache_dir), ADAPTFACE_CPU_DEVICES=str(cpu_devices), JAX_PLATFORMS="cpu")
  args = tiny_run_args(**{"optim.lr": 0.05, "eval.every_steps": STEPS, "checkpoint_every": 1000})
  cmd = [sys.executable, "-m", "adaptface_jax.main", f"--config=configs/lora_dino.py:demo,tiny,steps={STEPS}",
         f"--workdir={workdir}", *args, *extra]
  # Output to a file, not a pipe: a process blocked on a full pipe that is not being read would stall its peer.
  with open(log, "w") as out:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


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


def test_two_processes_train_and_evaluate_like_one(tmp_path, cache_dir):
  multi, single = tmp_path / "multi", tmp_path / "single"
  # First the one-process run: it prepares the data once (the two processes would each generate it).
  _finish([_start(single, cache_dir, 2, log=tmp_path / "single.log")], [tmp_path / "single.log"])
  address = f"--coordinator_address=127.0.0.1:{_free_port()}"
  logs = [tmp_path / f"process{index}.log" for index in range(2)]
  _finish([_start(multi, cache_dir, 1, "--multihost", address, "--num_processes=2", f"--process_id={index}",
                  log=logs[index]) for index in range(2)], logs)

  results = json.loads((multi / "results.json").read_text())
  names = ("synth_lfw", "synth_cfp_fp", "synth_agedb")
  assert all(results[name]["num_pairs"] == 40 for name in names)
  assert json.loads((multi / "summary.json").read_text())["steps"] == STEPS
  lines = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines if "loss/total" in line] == list(range(1, STEPS + 1))  # process 0 writes
  assert [line["step"] for line in lines if "eval/synth_lfw" in line] == [STEPS]

  (step_single, a), (step_multi, b) = _trainable(single, multi)
  assert step_single == step_multi == STEPS and a.keys() == b.keys()
  assert all(np.abs(v).max() > 1e-3 for k, v in b.items() if k.endswith("lora_b"))  # trained from zero
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
  single_results = json.loads((single / "results.json").read_text())
  for name in names:
    assert abs(results[name]["accuracy"] - single_results[name]["accuracy"]) <= 1 / 40, name
