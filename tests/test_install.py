"""The accelerator install lines of docs/training.md resolve to one jax, one jaxlib and the
accelerator plugin of the pinned version (pip's resolver, with --dry-run: nothing is installed)."""
import json
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

_PIN = re.search(r"^jax==(\S+)$", (REPO_ROOT / "requirements.txt").read_text(), re.MULTILINE)[1]
_LINES = re.findall(r'^pip install -r requirements.txt "jax\[(\w+)\]==(\S+)"',
                    (REPO_ROOT / "docs" / "training.md").read_text(), re.MULTILINE)
# What each extra must add, at the pinned version where it is a JAX package.
_PLUGINS = {"cuda12": {"jax-cuda12-plugin": _PIN, "jax-cuda12-pjrt": _PIN},
            "tpu": {"libtpu": None}}


def test_the_docs_give_a_line_for_gpus_and_tpus_at_the_pinned_version():
  assert sorted(extra for extra, _ in _LINES) == ["cuda12", "tpu"]
  assert all(version == _PIN for _, version in _LINES), (_LINES, _PIN)
  readme = (REPO_ROOT / "README.md").read_text()
  for extra, version in _LINES:
    assert f'pip install -r requirements.txt "jax[{extra}]=={version}"' in readme


@pytest.mark.parametrize("extra", sorted(_PLUGINS))
def test_the_install_line_resolves_to_matching_versions(extra, tmp_path):
  report = tmp_path / "report.json"
  done = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
       "--report", str(report), "-r", str(REPO_ROOT / "requirements.txt"), f"jax[{extra}]=={_PIN}"],
      capture_output=True, text=True, timeout=600)
  if done.returncode and re.search(r"(?i)connection|resolve host|network is unreachable", done.stderr):
    pytest.skip(f"no package index reachable: {done.stderr.strip().splitlines()[-1]}")
  assert done.returncode == 0, done.stderr[-3000:]
  versions = {}
  for item in json.loads(report.read_text())["install"]:
    versions.setdefault(item["metadata"]["name"].lower(), []).append(item["metadata"]["version"])
  assert versions["jax"] == [_PIN] and versions["jaxlib"] == [_PIN]
  for package, version in _PLUGINS[extra].items():
    assert len(versions.get(package, [])) == 1, (package, sorted(versions))
    assert version is None or versions[package] == [version], (package, versions[package])
