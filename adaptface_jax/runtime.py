"""Process set-up for the command-line entry points: run under tcmalloc when it is installed.

XLA:CPU allocates the temporary buffers of every step afresh (gigabytes for a ViT train step). glibc's malloc
serves blocks above 32 MB with mmap and unmaps them when freed, so each step page-faults all of that memory in
again: 1.5 million page faults and 2-7 s of kernel time per ViT-S/14 224 px step on a 2-core machine. tcmalloc
keeps the memory, and the same step ran 2x faster (launch/benchmark.py, ours vs the PyTorch reference, both
under the same allocator). The entry points call `use_tcmalloc()` first; it re-executes the command once with
the library preloaded. ADAPTFACE_TCMALLOC=0 keeps the system allocator.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # Debian / Ubuntu: apt install libtcmalloc-minimal4
_SWITCH = "ADAPTFACE_TCMALLOC"


def find_tcmalloc() -> str | None:
  for name in _LIBRARIES:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def tcmalloc_preloaded() -> bool:
  return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def use_tcmalloc() -> None:
  """Re-executes this command with tcmalloc in LD_PRELOAD, unless it is there already, absent, or switched off."""
  if not sys.platform.startswith("linux") or os.environ.get(_SWITCH, "1") == "0":
    return
  if tcmalloc_preloaded():  # also stops a second re-execution
    return
  library = find_tcmalloc()
  if library is None:
    log.warning("tcmalloc not found: steps on CPU can take up to 2x longer with glibc's malloc. Install it "
                "(apt install libtcmalloc-minimal4) or set %s=0 to silence this.", _SWITCH)
    return
  env = dict(os.environ, LD_PRELOAD=f"{os.environ.get('LD_PRELOAD', '')} {library}".strip())
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
