"""The package's layout as the README gives it, and its dependencies."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _layout_paths() -> list[str]:
  section = README[README.index("## Layout"):]
  return re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)


def test_the_readme_layout_table_matches_the_tree():
  listed = _layout_paths()
  assert len(listed) > 20
  missing = [path for path in listed if not (ROOT / path).exists()]
  assert not missing, f"README layout lists paths that do not exist: {missing}"
  package = ROOT / "adaptface_jax"
  modules = [path.relative_to(ROOT).as_posix() for path in sorted(package.glob("*.py")) + sorted(
      (package / "models").glob("*.py")) if not path.name.startswith("__")]
  unlisted = [module for module in modules if module not in listed]
  assert not unlisted, f"modules the README layout table does not list: {unlisted}"


def test_every_readme_command_names_a_module_or_script_that_exists():
  modules = set(re.findall(r"python -m (adaptface_jax(?:\.\w+)*)", README))
  scripts = set(re.findall(r"\b(launch/[\w.]+\.(?:py|sh))\b", README))
  assert {"adaptface_jax.main", "adaptface_jax.evaluate", "adaptface_jax.inspect_params"} <= modules
  for module in modules:
    parts = module.split(".")
    path = ROOT.joinpath(*parts)
    assert path.with_suffix(".py").exists() or (path / "__main__.py").exists(), module
  assert scripts and all((ROOT / script).exists() for script in scripts), scripts


def _run(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("cli", ["evaluate", "export"])
def test_evaluation_and_export_do_not_import_the_training_loop_nor_casia_training_the_renderer(cli):
  out = _run("import sys\n"
             f"import adaptface_jax.{cli}, adaptface_jax.run_state, adaptface_jax.embeddings\n"
             "from adaptface_jax.data import pipeline\n"
             "from configs import lora_dino\n"
             "print(sorted(m for m in ('adaptface_jax.train', 'adaptface_jax.data.synthetic') if m in sys.modules))")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", out.stdout


def test_the_entry_points_import_into_one_process_and_keep_their_own_flags():
  """Tests and scripts import the entry points' functions; several define the same flags (--workdir, --step, ...)."""
  out = _run("from absl import flags\n"
             "import adaptface_jax.export, adaptface_jax.identify, adaptface_jax.evaluate, adaptface_jax.main, "
             "adaptface_jax.inspect_params\n"
             "print(flags.FLAGS['workdir'].help, flags.FLAGS['gallery'].help, sep='|')")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().startswith("Training workdir.|Gallery folder"), out.stdout
  help_text = subprocess.run([sys.executable, "-m", "adaptface_jax.identify", "--helpfull"], cwd=ROOT,
                             capture_output=True, text=True).stdout
  assert "A training workdir: its checkpoint embeds the faces." in help_text


def test_every_python_file_indents_by_two_spaces():
  """The indentation half of the style that ruff (pyproject.toml) does not check: every block is 2 spaces deeper."""
  import io
  import tokenize
  offenders = {}
  for path in sorted(ROOT.glob("**/*.py")):
    relative = path.relative_to(ROOT).as_posix()
    if relative.startswith((".", "runs/", "workdirs/")) or "/." in relative:
      continue
    depths = [0]
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
      if token.type == tokenize.INDENT:
        if len(token.string) - depths[-1] != 2:
          offenders.setdefault(relative, token.start[0])
        depths.append(len(token.string))
      elif token.type == tokenize.DEDENT:
        depths.pop()
  assert not offenders, f"blocks not indented by 2 spaces (file: first line): {offenders}"
