"""A run's state, built from its config or rebuilt from its workdir.

`setup(config, ...)` gives the model, the initial `TrainState`, the frozen tree and the optimizer (training starts
here); `load_run(workdir)` restores a finished or running run from its checkpoints (evaluation and export start
here, without the training loop); `init_from_run` starts a new run from another run's trainable weights
(config.init_from).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from adaptface_jax import checkpoints, optim, trainable_rules
from adaptface_jax.data.common import DOMAIN_NAMES
from adaptface_jax.models import face_model, hf_weights

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  trainable: Any
  opt_state: Any
  rng: jnp.ndarray  # raw uint32 key, folded with the step: the same randomness however a run was interrupted


def setup(config: ml_collections.ConfigDict, num_classes: int, steps: int):
  """Model, initial state, frozen tree and optimizer for a config (the backbone weights are loaded here)."""
  backbone = hf_weights.load_backbone(config.model.backbone, random_init=config.model.random_init,
                                      seed=config.seed)
  model = face_model.create_model(config, backbone.config)
  labelled = len(DOMAIN_NAMES)
  if (config.router.mode == "oracle" or config.loss.supervised_weight > 0) and model.num_domains != labelled:
    raise ValueError(f"oracle routing and the supervised domain loss use the data's {labelled} domain labels "
                     f"{DOMAIN_NAMES}; they need adapter.num_domains == {labelled}, not {model.num_domains}")
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  variables = jax.jit(lambda r: face_model.init_variables(model, r, num_classes))(init_rng)
  variables["params"]["backbone"] = backbone.params
  trainable, frozen = trainable_rules.split(variables, config.trainable)
  tx, schedule = optim.make_optimizer(config.optim, steps)
  state = TrainState(step=jnp.asarray(0, jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                     rng=state_rng)
  return model, state, frozen, tx, schedule


# The sections of a run's config.json that loading it reads (training writes them all).
CONFIG_SECTIONS = {"seed": "a number", "model": "a section", "adapter": "a section", "router": "a section",
                   "loss": "a section", "eval": "a section", "optim": "a section", "trainable": "a list of rules"}


def read_config(path: Path, flag: str = "") -> ml_collections.ConfigDict:
  """The config a training run wrote to `path` (its workdir's config.json). Invalid JSON, JSON of another kind and
  a missing or mistyped section (CONFIG_SECTIONS) are refused with a ValueError naming the file; `flag`, where the
  user gave the run through one (--config.init_from=...), starts the message."""
  where = f"{flag}: {path}" if flag else str(path)
  hint = "a training workdir's config.json is the config its run was started with, as training wrote it"
  try:
    data = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{where}: not valid JSON ({error}); {hint}") from None
  if not isinstance(data, dict):
    raise ValueError(f"{where}: holds a JSON {type(data).__name__}, not an object of config sections "
                     f"({', '.join(CONFIG_SECTIONS)}); {hint}")
  kinds = {"a number": (int, float), "a section": dict, "a list of rules": (list, tuple)}
  missing = [name for name in CONFIG_SECTIONS if name not in data]
  mistyped = [f"{name} (not {kind})" for name, kind in CONFIG_SECTIONS.items()
              if name in data and (not isinstance(data[name], kinds[kind]) or isinstance(data[name], bool))]
  if missing or mistyped:
    raise ValueError(f"{where}: not a run's config: " + "; ".join(
        ([f"no {', '.join(missing)}"] if missing else []) + ([f"{', '.join(mistyped)}"] if mistyped else []))
        + f"; {hint}")
  return ml_collections.ConfigDict(data)


@contextlib.contextmanager
def config_fields(path: Path, flag: str = ""):
  """Turns a config field that the config.json at `path` lacks (ml_collections' AttributeError, raised while the run
  is rebuilt from it) into a ValueError naming the file and the field."""
  try:
    yield
  except AttributeError as error:
    field = str(error.args[0] if error.args else error).strip("\"'")
    if not re.fullmatch(r"\w+", field):
      raise
    where = f"{flag}: {path}" if flag else str(path)
    raise ValueError(f"{where}: the run's config has no field `{field}` (a config.json of another version of the "
                     "project, or edited by hand?)") from error


def load_run(workdir: str, *, step: int | None = None, which: str = "last"):
  """(config, model, variables, meta) of a finished or running training run, for evaluation and export.

  Without `step`, the newest checkpoint of last/ that reads back as it was saved: a damaged newer one is reported
  (a line each) and passed over, as a resumed run does, but left where it is. A damaged `step` or best checkpoint
  is refused, naming the steps of last/ to pass instead."""
  workdir = Path(workdir).expanduser()
  if not (workdir / "config.json").exists():
    raise FileNotFoundError(f"{workdir} is not a training workdir (no config.json)")
  config = read_config(workdir / "config.json")
  with config_fields(workdir / "config.json"):
    best_metric = config.eval.best_metric
  manager = checkpoints.Checkpoints(workdir / "checkpoints", best_metric=best_metric)
  newest = manager.best_step() if which == "best" else manager.latest_step()
  if step is None and newest is None:
    raise FileNotFoundError(f"no {which} checkpoint in {manager.directory}")
  # A damaged best checkpoint is refused: an older step of last/ is no stand-in for the best one.
  candidates = [step] if step is not None else [newest] if which == "best" else manager.all_steps()[::-1]
  model = None
  for index, candidate in enumerate(candidates):
    try:
      meta = manager.read_meta(candidate, which)
      if model is None:
        num_classes, steps = meta["num_classes"], max(int(meta.get("total_steps", 1)), 1)
        with config_fields(workdir / "config.json"):
          model, state, frozen, _, _ = setup(config, num_classes, steps=steps)
      restored = manager.restore(state, step=candidate, which=which,
                                 expected_fingerprint=checkpoints.fingerprint(frozen))
      break
    except checkpoints.DamagedCheckpoint as error:
      others = [s for s in manager.all_steps() if s != candidate]
      if step is not None or index == len(candidates) - 1:
        manager.close()
        raise checkpoints.DamagedCheckpoint(
            f"{error}; " + (f"--step {' or '.join(map(str, others))} names another of the run's checkpoints"
                            if others else "the run has no other checkpoint")) from error
      log.warning("%s; taking the previous checkpoint", error)
  manager.close()
  return config, model, trainable_rules.merge(restored.trainable, frozen), meta


def _backbone(config: ml_collections.ConfigDict) -> str:
  return config.model.backbone + (" (random init)" if config.model.get("random_init", False) else "")


def _shown(paths: list[str], limit: int = 8) -> str:
  return ", ".join(paths[:limit]) + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def init_from_run(state: TrainState, frozen, config: ml_collections.ConfigDict, source_workdir: str, *,
                  tx=None) -> TrainState:
  """`state`, a new run's initial state, with its trainable leaves taken from the last checkpoint of the run in
  `source_workdir` (config.init_from). Step and rng stay those of the new run; the optimizer state is `tx.init` of
  the new weights (with tx None, the state's own, which setup made fresh).

  A leaf of the same path and shape takes the source's value; a LoRA leaf [1, ...] of the source goes into each
  domain of a DA-LoRA leaf [K, ...]; a leaf the source has not (the router of DA-LoRA, an added LoRA target) keeps
  its initialisation, and so do the class centres (margin/) when the number of classes differs. Refused with a
  ValueError, before anything is written: another backbone or other frozen weights, DA-LoRA -> LoRA, any other
  difference of shape, and a source leaf this run has not (other targets; margin/ aside). A source that is no
  training workdir or has no checkpoint: FileNotFoundError.
  """
  flag = f"--config.init_from={source_workdir}"
  source = Path(source_workdir).expanduser()
  if not (source / "config.json").exists():
    raise FileNotFoundError(f"{flag}: {source} is not a training workdir (no config.json)")
  source_config = read_config(source / "config.json", flag)
  with config_fields(source / "config.json", flag):
    source_backbone = _backbone(source_config)
    theirs_k = source_config.adapter.num_domains if source_config.adapter.rank else 0
    source_scale = (source_config.adapter.get("alpha"), source_config.adapter.get("rslora"))  # for a warning
    source_trainable = list(source_config.trainable)
  if source_backbone != _backbone(config):
    raise ValueError(f"{flag}: that run adapted the backbone {source_backbone}, this config loads "
                     f"{_backbone(config)}; a run can only start from a run of the same backbone")
  ours_k = config.adapter.num_domains if config.adapter.rank else 0
  if theirs_k > 1 and ours_k == 1:
    raise ValueError(f"{flag}: that run is DA-LoRA with {theirs_k} domain adapters, this config plain LoRA "
                     f"(adapter.num_domains=1); DA-LoRA -> LoRA is not supported (there is no one adapter to take)")
  manager = checkpoints.Checkpoints(source / "checkpoints")
  step = manager.latest_step()
  meta = manager.read_meta(step) if step is not None else None
  manager.close()
  if meta is None:
    raise FileNotFoundError(f"{flag}: {source} has no checkpoint (nothing in {manager.directory / 'last'})")
  if meta["frozen_fingerprint"] != checkpoints.fingerprint(frozen):
    raise ValueError(f"{flag}: that run's frozen weights (backbone {source_backbone}) differ from this "
                     f"config's (backbone {_backbone(config)}): another seed of a random init, or other "
                     f"config.trainable rules; a run can only start from a run of the same frozen weights")

  _, _, variables, _ = load_run(str(source), step=step)
  theirs = trainable_rules.flatten(trainable_rules.split(variables, source_trainable)[0])
  ours = trainable_rules.flatten(state.trainable)
  taken, tiled, kept, unfit = {}, [], [], []
  for path, leaf in ours.items():
    value = theirs.get(path)
    if value is None:
      kept.append(path)
    elif value.shape == leaf.shape:
      taken[path] = value
    elif path.startswith("lora/") and value.shape[0] == 1 and value.shape[1:] == leaf.shape[1:]:
      taken[path] = jnp.broadcast_to(value, leaf.shape)  # LoRA -> DA-LoRA: every domain starts from the adapter
      tiled.append(path)
    elif path.startswith(face_model.MARGIN + "/"):  # the class centres of another number of identities
      kept.append(f"{path} ({list(value.shape)} there, {list(leaf.shape)} here)")
    else:
      unfit.append(f"{path}: {list(value.shape)} there, {list(leaf.shape)} here")
  unfit += [f"{path}: {list(value.shape)} there, absent here" for path, value in theirs.items()
            if path not in ours and not path.startswith(face_model.MARGIN + "/")]
  if unfit:
    raise ValueError(f"{flag}: {len(unfit)} trainable leaves of that run do not fit this config (another adapter "
                     "rank, targets or embedding size?): " + "; ".join(unfit[:6]) + ("; ..." * (len(unfit) > 6)))
  scale = (config.adapter.alpha, config.adapter.rslora)
  if taken and source_scale != scale:
    log.warning("%s: that run's adapters were trained at another scale: (alpha, rslora) %s there, %s here", flag,
                source_scale, scale)
  log.info("%d of %d trainable leaves initialised from %s (step %d)%s; kept their own initialisation: %s", len(taken),
           len(ours), source, step, f", {len(tiled)} LoRA leaves copied into each of {ours_k} domains"
           if tiled else "", _shown(kept) or "none")
  trainable = trainable_rules.unflatten({p: jnp.asarray(taken.get(p, leaf), leaf.dtype) for p, leaf in ours.items()})
  return state.replace(trainable=trainable, opt_state=tx.init(trainable) if tx is not None else state.opt_state)
