"""Hub ids go through huggingface_hub: the HF cache (offline), the download branch, a clear error without either;
and the `--config.<field>` / `--flag` names that error messages and the README tell users to type exist."""

import hashlib
import re
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import random_images
from huggingface_hub import constants
from safetensors.numpy import load_file

from adaptface_jax import load_backbone
from adaptface_jax.models import face_model, hf_weights
from configs import common

ROOT = Path(__file__).resolve().parents[1]
DINO, CLIP = common.BACKBONES["dino"], common.BACKBONES["clip"]
TOL = 1e-4


def tiny_hf_model(family: str):
  """A small transformers model of a family, random weights, in eval mode."""
  from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model
  torch.manual_seed(0)
  if family == "dinov2":
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                                     patch_size=14))
  else:  # the hub's openai/clip-vit-* repositories hold a whole CLIPModel
    model = CLIPModel(CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=16, image_size=32),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16))
  return model.eval()


def write_hf_cache(hf_home: Path, hub_id: str, model) -> Path:
  """`model` saved as the HF cache holds a download: hub/models--ns--name/{snapshots/<rev>/, refs/main}."""
  repo = Path(hf_home) / "hub" / ("models--" + hub_id.replace("/", "--"))
  revision = hashlib.sha1(hub_id.encode()).hexdigest()
  snapshot = repo / "snapshots" / revision
  model.save_pretrained(snapshot)
  (repo / "refs").mkdir(parents=True, exist_ok=True)
  (repo / "refs" / "main").write_text(revision)
  return snapshot


@pytest.fixture(scope="module")
def models():
  return {"dinov2": tiny_hf_model("dinov2"), "clip": tiny_hf_model("clip")}


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
  """An empty HF cache, offline; huggingface_hub reads its settings at import, so they are patched where read."""
  home = tmp_path / "hf_home"
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return home


@pytest.fixture
def hub_calls(monkeypatch):
  """Every snapshot_download call (repo id, allow_patterns), still answered by the real function."""
  calls, real = [], huggingface_hub.snapshot_download

  def spy(repo_id, **kwargs):
    calls.append((repo_id, kwargs.get("allow_patterns")))
    return real(repo_id, **kwargs)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
  return calls


def _assert_parity(backbone, model, family):
  size = 28 if family == "dinov2" else 32
  images = random_images(2, size)
  out = backbone.encode(images)
  with torch.no_grad():
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
    ref = model(pixel_values=pixels) if family == "dinov2" else model.vision_model(pixel_values=pixels)
  for key in ("last_hidden_state", "pooler_output"):
    assert np.abs(np.asarray(out[key]) - getattr(ref, key).numpy()).max() < TOL, key
  if family == "clip":
    with torch.no_grad():
      projected = model.visual_projection(ref.pooler_output).numpy()
    assert np.abs(np.asarray(out["image_embeds"]) - projected).max() < TOL


@pytest.mark.parametrize("family,hub_id", [("dinov2", DINO), ("clip", CLIP)])
def test_hub_id_loads_from_the_hf_cache_offline(hf_home, hub_calls, models, family, hub_id):
  snapshot = write_hf_cache(hf_home, hub_id, models[family])
  backbone = load_backbone(hub_id)
  assert backbone.source == str(snapshot)  # the cached weights, not an architecture preset
  assert hub_calls and all(call[0] == hub_id for call in hub_calls)
  assert backbone.config.hidden_size == 32
  _assert_parity(backbone, models[family], family)


def test_architecture_of_a_cached_hub_id_and_of_presets(hf_home, hub_calls, models):
  write_hf_cache(hf_home, DINO, models["dinov2"])
  hf_config, snapshot = hf_weights.read_architecture(DINO)
  assert hf_config["hidden_size"] == 32 and snapshot is not None
  assert hub_calls == [(DINO, ["config.json"])]  # the architecture alone fetches no weights
  config = common.base_config("dino", "dalora")
  assert face_model.create_model(config).vit.hidden_size == 32
  hub_calls.clear()

  # random_init: the preset answers, the hub is not asked.
  with config.unlocked():
    config.model.random_init = True
  assert face_model.create_model(config).vit.hidden_size == 384
  for preset in ("tiny-dinov2", "synthface-dinov2", "synthface-clip"):
    with config.unlocked():
      config.model.backbone = preset
    assert face_model.create_model(config).vit.hidden_size == hf_weights.PRESETS[preset]["hidden_size"]
  assert hub_calls == []


def test_download_branch_uses_snapshot_download(tmp_path, monkeypatch, models):
  calls = []

  def fake_snapshot_download(repo_id, *, allow_patterns=None, **kwargs):
    calls.append((repo_id, allow_patterns))
    folder = tmp_path / "downloaded"
    if not folder.exists():
      models["dinov2"].save_pretrained(folder)
    return str(folder)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  backbone = load_backbone(DINO)
  assert backbone.source == str(tmp_path / "downloaded")
  assert calls[0][0] == DINO and "model.safetensors" in calls[0][1] and "config.json" in calls[0][1]
  _assert_parity(backbone, models["dinov2"], "dinov2")


def test_download_falls_back_to_pytorch_model_bin(tmp_path, monkeypatch, models):
  folder = tmp_path / "bin_only"
  models["dinov2"].save_pretrained(folder)
  # The checkpoint's own key names (transformers renames some in the live module's state_dict).
  torch.save({k: torch.from_numpy(v) for k, v in load_file(folder / "model.safetensors").items()},
             folder / "pytorch_model.bin")
  (folder / "model.safetensors").unlink()
  calls = []
  monkeypatch.setattr(huggingface_hub, "snapshot_download",
                      lambda repo_id, *, allow_patterns=None, **_: calls.append(allow_patterns) or str(folder))
  _assert_parity(load_backbone(DINO), models["dinov2"], "dinov2")
  assert calls == [["config.json", "model.safetensors"], ["config.json", "pytorch_model.bin"]]


def test_offline_with_an_empty_cache_says_what_to_do(hf_home, hub_calls):
  with pytest.raises(hf_weights.BackboneUnavailableError) as info:
    load_backbone(DINO)
  message = str(info.value)
  assert DINO in message and "--config.model.backbone" in message and ":demo" in message
  assert str(hf_home / "hub") in message and "\n" not in message  # one paragraph
  assert info.value.__cause__ is None and info.value.__suppress_context__  # not the hub client's traceback
  with pytest.raises(hf_weights.BackboneUnavailableError, match="someone/not-cached"):
    load_backbone("someone/not-cached")
  # Shapes stay known offline for the hub ids of the configs (`inspect`), and random_init needs no hub.
  assert hf_weights.read_architecture(DINO)[0] == hf_weights.PRESETS[DINO]
  hub_calls.clear()
  assert hf_weights.read_architecture(CLIP, random_init=True) == (hf_weights.PRESETS[CLIP], None)
  assert hub_calls == []


def test_cached_config_without_weights_is_refused(hf_home, models):
  snapshot = write_hf_cache(hf_home, DINO, models["dinov2"])
  (snapshot / "model.safetensors").unlink()
  with pytest.raises(hf_weights.BackboneUnavailableError, match="lacks config.json or the weights"):
    load_backbone(DINO)


def test_preset_name_and_unknown_source():
  with pytest.raises(ValueError, match="random_init=True"):
    load_backbone("tiny-dinov2")
  with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub id"):
    load_backbone("no-such-thing")


# ------------------------------------------------------------------------------------- names users are told


def _resolves(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


# `--config.x=y` is the grammar's placeholder (main.py's docstring), not a field.
PLACEHOLDERS = {"x"}


def test_every_config_field_named_to_users_exists():
  config = common.base_config("dino", "dalora")
  sources = sorted((ROOT / "adaptface_jax").rglob("*.py")) + [ROOT / "README.md"]
  named = {}
  for path in sources:
    for match in re.finditer(r"--config\.([a-z_][a-z0-9_.]*)", path.read_text()):
      named.setdefault(match.group(1).rstrip("."), path.relative_to(ROOT))
  assert "model.backbone" in named and "data.manual_dir" in named
  missing = {field: str(path) for field, path in named.items() if field not in PLACEHOLDERS
             and not _resolves(config, field)}
  assert not missing, f"--config fields that do not exist: {missing}"


CLI_MODULES = ("main", "evaluate", "export", "inspect_params", "identify")
ABSL_BUILTIN = {"help", "helpfull", "helpshort", "flagfile"}


def _defined_flags(module: str) -> set[str]:
  source = (ROOT / "adaptface_jax" / f"{module}.py").read_text()
  if "cli.MultihostFlags()" in source:  # --multihost and its companions, defined in cli.py
    source += (ROOT / "adaptface_jax" / "cli.py").read_text()
  # flags.DEFINE_x("name", ...) and cli.define(flags.DEFINE_x, "name", ...)
  return set(re.findall(r"DEFINE_\w+(?:\(|,)\s*\"([a-z_]+)\"", source)) | ABSL_BUILTIN


def test_every_readme_flag_of_the_commands_exists():
  checked = 0
  for line in (ROOT / "README.md").read_text().splitlines():
    match = re.search(r"python -m adaptface_jax\.(\w+)\b", line)
    if not match or match.group(1) not in CLI_MODULES:
      continue
    command = line[match.start():].split("#")[0]
    flags = set(re.findall(r"(?<![\w-])--([a-z_]+)(?![\w.])", command))
    unknown = flags - _defined_flags(match.group(1))
    assert not unknown, f"README: `python -m adaptface_jax.{match.group(1)}` has no flag(s) {sorted(unknown)}: {line}"
    checked += len(flags)
  assert checked >= 10
