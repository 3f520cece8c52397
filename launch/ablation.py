"""Runs a named sweep of the ablation matrix, one `adaptface_jax.main` run per cell, each in its own workdir.

  python launch/ablation.py --sweep matrix --runs_dir runs/matrix                 # the 2x2 matrix, real data
  python launch/ablation.py --sweep study --base demo --runs_dir runs/synthetic   # the synthetic study, CPU
  python launch/ablation.py --sweep rank --runs_dir runs/rank --dry-run           # print the commands
  python launch/ablation.py --sweep matrix --runs_dir runs/matrix --slurm job.sh  # a SLURM job array instead

Finished cells (summary.json present) are skipped; interrupted ones resume from their last checkpoint.
Sweeps are declared in configs/common.py (SWEEPS). Extra arguments after `--` go to every run
(e.g. `-- --config.optim.lr=3e-4`).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import common  # noqa: E402


def cells(sweep: str, base: str) -> list[tuple[str, list[str]]]:
  if sweep not in common.SWEEPS:
    raise SystemExit(f"unknown sweep {sweep!r}; known: {sorted(common.SWEEPS)}")
  out = []
  for experiment, arg in common.SWEEPS[sweep]:
    full_arg = ",".join(filter(None, [base, arg]))
    config = f"configs/{experiment}.py" + (f":{full_arg}" if full_arg else "")
    out.append((common.cell_name(experiment, arg), ["--config", config]))
  return out


def command(config_args: list[str], workdir: Path, extra: list[str], multihost: bool = False) -> list[str]:
  return ([sys.executable, "-m", "adaptface_jax.main", *config_args, "--workdir", str(workdir)]
          + (["--multihost"] if multihost else []) + extra)


def slurm_script(commands: list[list[str]], runs_dir: Path) -> str:
  lines = ["#!/usr/bin/env bash",
           "# One array task per cell; each task may span several nodes (jax.distributed via --multihost).",
           f"#SBATCH --array=0-{len(commands) - 1}",
           "#SBATCH --job-name=adaptface-ablation",
           "#SBATCH --ntasks-per-node=1",
           f"#SBATCH --output={runs_dir}/slurm-%A_%a.out",
           "#SBATCH --signal=TERM@120",
           "set -euo pipefail",
           f"cd {shlex.quote(str(ROOT))}",
           "case \"$SLURM_ARRAY_TASK_ID\" in"]
  for i, cmd in enumerate(commands):
    srun = ["srun", "python", *cmd[1:]]
    lines.append(f"  {i}) {shlex.join(srun)} ;;")
  lines += ["  *) echo \"no cell $SLURM_ARRAY_TASK_ID\" >&2; exit 1 ;;", "esac", ""]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", required=True)
  parser.add_argument("--runs_dir", required=True, type=Path)
  parser.add_argument("--base", default="", help="config argument added to every cell, e.g. demo")
  parser.add_argument("--dry-run", action="store_true")
  parser.add_argument("--slurm", type=Path, help="write a SLURM job-array script here instead of running")
  args, extra = parser.parse_known_args(argv)
  extra = [e for e in extra if e != "--"]
  todo = []
  for name, config_args in cells(args.sweep, args.base):
    workdir = args.runs_dir / name
    if (workdir / "summary.json").exists() and not args.slurm:
      print(f"[done] {name}")
      continue
    todo.append((name, command(config_args, workdir, extra, multihost=bool(args.slurm))))
  if args.slurm:
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    args.slurm.write_text(slurm_script([cmd for _, cmd in todo], args.runs_dir.absolute()))
    print(f"wrote {args.slurm} ({len(todo)} array tasks); submit with: sbatch {args.slurm}")
    return 0
  for name, cmd in todo:
    print(f"[run] {name}: {shlex.join(cmd)}", flush=True)
    if not args.dry_run:
      subprocess.run(cmd, check=True, cwd=ROOT)
  return 0


if __name__ == "__main__":
  sys.exit(main())
