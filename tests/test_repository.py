"""The README's newcomer commands are exactly what CI runs."""
import re

from conftest import REPO_ROOT


def test_ci_runs_exactly_the_readme_commands():
  readme = (REPO_ROOT / "README.md").read_text()
  first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
  ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
  assert len(first_block) == 2
  commands = [line for line in ci_lines if line and not line.startswith(("#", "set ", "cd ", "rm "))]
  assert commands == first_block


_USER_PATH_CODE = sorted([*(REPO_ROOT / "yolov9_jax").rglob("*.py"),
                          *(REPO_ROOT / name for name in ("train.py", "eval.py", "detect.py", "export.py"))])


def test_no_user_path_reaches_pathlib_or_the_builtin_open():
  """Paths users give may be gs:// URLs, which pathlib mangles (gs:/bucket) and open() cannot
  read: they go through yolov9_jax.paths (etils.epath). A line that really means a local file
  (this repository's own files, data generated on this machine) says so with '# local:'."""
  offending = []
  for path in _USER_PATH_CODE:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
      code = line.split("#", 1)[0]
      if (re.search(r"\bpathlib\.\w", code) or re.search(r"(?<![\w.])open\(", code)) \
          and "# local:" not in line:
        offending.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
  assert not offending, "\n".join(offending)
  assert len(_USER_PATH_CODE) > 30  # the whole package was read
