"""What every command-line entry point shares: its logging, and the handling of errors in what the user gave (a
file, a flag, a config field): they end the command with one paragraph on stderr and exit status 1, not a
traceback; `--debug` shows the traceback instead.

The user errors are the ones the project raises when it checks its input: ValueError and its subclasses
(RecordIOError, CheckpointError, DamagedCheckpoint, FingerprintMismatch, ImageTooLarge, ijb.ReleaseError), OSError
(a missing or unreadable file; BackboneUnavailableError: weights neither cached nor downloadable; SaveFailed: a
checkpoint a peer never reached) and pickle.UnpicklingError (a .bin that is not a pickle, or a refused one).
Anything else is a fault of the program and keeps its traceback.

What the commands write goes through two helpers here: `refuse_run_files` keeps every output off a training
workdir's own files, and `write_atomically` writes a file so that an interrupted or failed write leaves the old one
(or none) in place, with an error naming the file.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

from absl import app, flags
from absl import logging as absl_logging

_DEBUG = flags.DEFINE_bool("debug", False, "On an error in the input, show the full traceback instead of the "
                           "one-paragraph message.")


USER_ERRORS = (ValueError, OSError, pickle.UnpicklingError)


def define(define_flag: Callable, name: str, *args, **kwargs) -> flags.FlagHolder:
  """`define_flag(name, *args, **kwargs)` (an absl or ml_collections DEFINE_* function), or the flag `name` as it is
  when another entry point imported into this process defined it first. The entry points are libraries too (tests
  and scripts import their functions), and several share flag names (--workdir, --step, --out, --config, --json);
  a command run from the shell imports one entry point, which defines its own."""
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return define_flag(name, *args, **kwargs)


class MultihostFlags:
  """--multihost and its companions, for the entry points that can run over several processes."""

  def __init__(self):
    self.multihost = define(
        flags.DEFINE_bool, "multihost", False, "Join a multi-process run (jax.distributed.initialize): the flags "
        "below where given, else JAX_COORDINATOR_ADDRESS and the cluster's environment (SLURM, Open MPI, Kubernetes, "
        "Cloud TPU). Every process runs the same command.")
    self.coordinator_address = define(flags.DEFINE_string, "coordinator_address", None,
                                      "--multihost: host:port that process 0 listens on, reachable by all.")
    self.num_processes = define(flags.DEFINE_integer, "num_processes", None,
                                "--multihost: how many processes take part.", lower_bound=1)
    self.process_id = define(flags.DEFINE_integer, "process_id", None,
                             "--multihost: this process's index, 0 .. num_processes - 1.", lower_bound=0)
    self.peer_timeout = define(
        flags.DEFINE_float, "peer_timeout", 30.0, "--multihost: a process silent for this many seconds is taken "
        "as lost, and the others end with a message naming it, the last checkpoint and how to resume.")

  def join(self, batch_size: int | None = None) -> None:
    """Joins the multi-process run with --multihost (peers.join), else presents this machine's CPU devices (no
    effect on a GPU). Must run before JAX's first computation."""
    from adaptface_jax import peers, runtime
    if self.multihost.value:
      peers.join(self.coordinator_address.value, self.num_processes.value, self.process_id.value,
                 batch_size=batch_size, timeout_s=self.peer_timeout.value)
    elif any(f.value is not None for f in (self.coordinator_address, self.num_processes, self.process_id)):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id need --multihost")
    else:  # on CPU, one device per core; batches are sharded over them (see runtime.py)
      runtime.use_cpu_devices(batch_size)


# What training writes into its workdir: no other command may write over these, or inside the folders among them.
RUN_FILES = ("config.json", "checkpoints", "metrics.jsonl", "summary.json", "results.json", "results.md", "roc.png",
             "domain_weights.png", "tensorboard")


def is_training_workdir(path: Path) -> bool:
  """A folder holding a training run: its config.json beside its checkpoints/ or metrics.jsonl."""
  return (path / "config.json").is_file() and ((path / "checkpoints").is_dir()
                                               or (path / "metrics.jsonl").is_file())


def refuse_run_files(path: str | os.PathLike, *, flag: str, workdirs=()) -> None:
  """Raises ValueError, naming `path`, when a command's output `path` (a file it writes, or a folder it writes into)
  is a training workdir or one of the workdir's own files (RUN_FILES), or lies inside one of them. The workdirs are
  `workdirs` (the runs the command reads) and any training workdir that holds `path`. Outputs in other folders of a
  workdir (identify/, export/, eval_step<N>/) are fine."""
  target = Path(path).expanduser().resolve()
  runs = {Path(w).expanduser().resolve() for w in workdirs if w}
  runs |= {folder for folder in (target, *target.parents) if is_training_workdir(folder)}
  for run in sorted(runs):
    if target == run:
      raise ValueError(f"{flag}={path}: that is the training workdir {run} itself, which holds the run's "
                       f"{', '.join(RUN_FILES[:3])}...; give another folder (a new one, or a new subfolder of the "
                       "workdir)")
    if run in target.parents and target.relative_to(run).parts[0] in RUN_FILES:
      own = run / target.relative_to(run).parts[0]
      raise ValueError(f"{flag}={path}: {own} belongs to the training run in {run} (its own files: "
                       f"{', '.join(RUN_FILES)}), which no command's output may replace; give another path")


def write_atomically(path: Path, write: Callable[[IO], None], *, binary: bool = False) -> None:
  """`write(file)` into a temporary file beside `path` (its parent folders made first), then renamed over `path`: a
  write that fails or is interrupted leaves `path` as it was. An OSError on the way (a full disk, no permission)
  is raised again naming `path`."""
  path = Path(path)
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary.unlink(missing_ok=True)  # left by a killed process of the same id
    with open(temporary, "xb" if binary else "x", **({} if binary else {"newline": ""})) as handle:
      write(handle)
    os.replace(temporary, path)
  except OSError as error:
    raise OSError(f"cannot write {path}: {error}") from error
  finally:
    try:
      temporary.unlink(missing_ok=True)
    except OSError:  # the parent folder could not be made: there is no temporary file
      pass


def _fail(message: str) -> None:
  sys.exit(f"error: {message}\n(--debug shows the traceback)")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with an override of a config field that does not exist (ml_collections raises AttributeError
  or KeyError from deep inside) said in one sentence that names the override and the fields that do exist there."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    _fail(f"{error}\n(--help lists the flags)")
  except (AttributeError, KeyError) as error:
    if "--debug" in argv:
      raise
    missing, *hint = str(error.args[0] if error.args else error).split("\n")
    missing = missing.strip("\"'")
    overrides = [arg for arg in argv if re.match(rf"--\w+\.(\w+\.)*{re.escape(missing)}(\.|=|$)", arg)]
    if not overrides:
      raise
    flag, *path = overrides[0].split("=")[0][2:].split(".")
    path = path[:path.index(missing) + 1]
    parent = flags.FLAGS[flag].value
    if parent is None:  # absl had not stored the loaded config yet
      given = [b if a == f"--{flag}" else a.split("=", 1)[1] for a, b in zip(argv, argv[1:] + [""])
               if a == f"--{flag}" or a.startswith(f"--{flag}=")]
      parent = flags.FLAGS[flag].parser.parse(given[-1]) if given else None
    for name in path[:-1]:
      parent = parent.get(name) if hasattr(parent, "get") else None
    known = f" Its fields there: {', '.join(sorted(parent.keys()))}." if hasattr(parent, "keys") else ""
    _fail(f"{overrides[0]}: the config has no field `{'.'.join(path)}`.{known} {' '.join(hint)}".rstrip())


def run(main: Callable[[list[str]], None]) -> None:
  """absl's app.run(main), with the project's user errors printed as messages (see the module docstring), and
  the project's progress logged at INFO while the libraries' (orbax, absl) show from WARNING up."""
  def guarded(argv):
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("adaptface_jax").setLevel(logging.INFO)
    try:
      return main(argv)
    except USER_ERRORS as error:
      if _DEBUG.value:
        raise
      _fail(str(error))

  app.run(guarded, flags_parser=_parse_flags)
