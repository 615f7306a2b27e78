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
