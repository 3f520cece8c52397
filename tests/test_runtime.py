"""The entry points' re-execution under tcmalloc (adaptface_jax.runtime)."""

import os
import subprocess
import sys
from pathlib import Path

from adaptface_jax import runtime

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ("import os; from adaptface_jax import runtime; runtime.use_tcmalloc(); "
           "print('LD_PRELOAD=' + os.environ.get('LD_PRELOAD', ''))")


def _run(**env_updates):
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ADAPTFACE_TCMALLOC")}
  env.update(env_updates)
  return subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env, capture_output=True, text=True,
                        check=True)


def test_reexecutes_under_tcmalloc_when_installed_else_says_how_to_install():
  result = _run()
  preload = result.stdout.strip().splitlines()[-1]
  library = runtime.find_tcmalloc()
  if library is None:
    assert preload == "LD_PRELOAD=" and "apt install libtcmalloc-minimal4" in result.stderr
  else:
    assert preload == f"LD_PRELOAD={library}" and "tcmalloc not found" not in result.stderr


def test_switched_off_or_already_preloaded_runs_unchanged():
  switched_off = _run(ADAPTFACE_TCMALLOC="0")
  assert switched_off.stdout.strip() == "LD_PRELOAD="
  assert "tcmalloc not found" not in switched_off.stderr
  library = runtime.find_tcmalloc()
  if library is not None:  # already there: no second re-execution, LD_PRELOAD kept as given
    assert _run(LD_PRELOAD=library).stdout.strip() == f"LD_PRELOAD={library}"


def _devices(batch_size, **env_updates):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ADAPTFACE_CPU_DEVICES")}
  env.update(env_updates, JAX_PLATFORMS="cpu")
  program = ("import jax; from adaptface_jax import runtime; "
             f"print(runtime.use_cpu_devices({batch_size}), jax.device_count())")
  return subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True)


def test_one_cpu_device_per_core_that_divides_the_batch():
  cores = min(len(os.sched_getaffinity(0)), 8)
  assert _devices(None).stdout.split() == [str(cores)] * 2
  assert _devices(12, ADAPTFACE_CPU_DEVICES="5").stdout.split() == ["4", "4"]  # 5 does not divide 12
  assert _devices(7, ADAPTFACE_CPU_DEVICES="3").stdout.split() == ["1", "1"]
  bad = _devices(8, ADAPTFACE_CPU_DEVICES="two")
  assert bad.returncode != 0 and "ADAPTFACE_CPU_DEVICES='two': expected a positive integer" in bad.stderr
