"""README's commands run as written: every flag of every command exists in its script (and every
--config field in its config file), and the commands on the demo's own output run and agree with
what the demo printed."""
import importlib.util
import json
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

DEMO_WORKDIR = REPO_ROOT / "runs" / "shapes_demo"


def _readme_commands():
  """Each command of README's bash blocks as its argument list (continuations joined, comments
  and shell operators dropped), with the line it starts on."""
  text = (REPO_ROOT / "README.md").read_text()
  commands = []
  for block in re.finditer(r"```bash\n(.*?)```", text, re.DOTALL):
    joined = re.sub(r"\\\n\s*", " ", block.group(1))
    for line in joined.splitlines():
      words = shlex.split(line, comments=True)
      for start in [i for i, w in enumerate(words) if w == "python"]:
        words_after = words[start:]
        end = next((i for i, w in enumerate(words_after) if w in ("&&", ";", "|")), len(words_after))
        commands.append(words_after[:end])
  return commands


COMMANDS = _readme_commands()


def _help_text(script_args):
  result = subprocess.run([sys.executable, *script_args, "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
  return result.stdout + result.stderr


def test_the_readme_has_the_commands_it_should():
  scripts = {c[1] if c[1] != "-m" else c[2] for c in COMMANDS}
  assert {"train.py", "eval.py", "detect.py", "export.py", "yolov9_jax.bench"} <= scripts


def test_every_flag_of_every_readme_command_exists():
  helps = {}
  for command in COMMANDS:
    if command[1] == "-m" and command[2] == "pytest":
      continue
    script = command[1:3] if command[1] == "-m" else command[1:2]
    flags = [w.split("=")[0] for w in command[len(script) + 1:] if w.startswith("--")]
    if script == ["train.py"] or (script[0] in ("eval.py", "detect.py") and any(
        w.startswith("--config=") for w in command)):
      # train.py's flags, and eval.py's / detect.py's --config.* fields: the config file's.
      config_arg = next((w.split("=", 1)[1] for w in command if w.startswith("--config=")),
                        "configs/shapes_demo.py")
      path, _, argument = config_arg.partition(":")
      assert (REPO_ROOT / path).is_file(), command
      spec = importlib.util.spec_from_file_location("readme_config", REPO_ROOT / path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      config = module.get_config(argument) if argument else module.get_config()
      for flag in flags:
        if flag.startswith("--config."):
          node = config
          for name in flag[len("--config."):].split("."):
            assert name in node, f"README: {' '.join(command)}: no config field {flag}"
            node = node[name]
        elif script == ["train.py"]:
          assert flag in ("--config", "--workdir"), flag
      if script == ["train.py"]:
        continue
      flags = [flag for flag in flags if not flag.startswith("--config.")]
    key = " ".join(script)
    if key not in helps:
      helps[key] = _help_text(script)
    for flag in flags:
      name = flag[2:]
      assert re.search(rf"--(\[no\])?{re.escape(name)}\b", helps[key]), (
          f"README: {' '.join(command)}: {key} has no flag {flag}")


def _demo_commands(script):
  return [c for c in COMMANDS if c[1] == script and any("shapes_demo" in w for w in c)]


@pytest.mark.skipif(not (DEMO_WORKDIR / "metrics.jsonl").exists(),
                    reason="runs after the demo (python train.py), as in CI")
def test_the_readme_commands_on_the_demo_run_and_eval_prints_the_demos_numbers(
    tmp_path, a_subprocess_slot):
  """eval.py on the demo's workdir, with README's flags, gives the demo's final evaluation:
  the same weights, protocol and annotations (AP_small etc. included); detect.py and export.py
  write their files."""
  rows = [json.loads(line) for line in (DEMO_WORKDIR / "metrics.jsonl").read_text().splitlines()]
  final = [row for row in rows if "eval/AP" in row][-1]
  (eval_command,), (detect_command,) = _demo_commands("eval.py"), _demo_commands("detect.py")
  outputs = {"eval.py": tmp_path / "eval", "detect.py": tmp_path / "detect"}
  for command in (eval_command, detect_command):
    # README's commands, writing into this test's folder instead of runs/.
    args = [w if not w.startswith("--out_dir=") else f"--out_dir={outputs[command[1]]}"
            for w in command[1:]]
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((outputs["eval.py"] / "metrics.json").read_text())
  assert metrics["rectangular"]
  for name in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AR100"):
    assert metrics[name] == pytest.approx(final[f"eval/{name}"], abs=1e-6), name
  detections = json.loads((outputs["detect.py"] / "detections.json").read_text())
  assert len(detections["images"]) == 128 and not detections["unreadable"]
  export_commands = _demo_commands("export.py")
  assert {next((w for w in c if w.startswith("--format=")), "--format=pt")
          for c in export_commands} == {"--format=pt", "--format=onnx"}
  for export_command in export_commands:
    output = next(w.split("=", 1)[1] for w in export_command if w.startswith("--output="))
    args = [w if not w.startswith("--output=") else f"--output={tmp_path / output}"
            for w in export_command[1:]]
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    if "--format=onnx" not in export_command:
      assert (tmp_path / f"{output}.pt").is_file()
      assert (tmp_path / f"{output}.safetensors").is_file()
      continue
    # The deploy section's ONNX: any batch (--batch_size=0), the demo's settings in its metadata,
    # and it runs in onnxruntime.
    from yolov9_jax.deploy import runtimes  # pylint: disable=import-outside-toplevel
    detector = runtimes.load(str(tmp_path / f"{output}.onnx"))
    assert detector.runtime.startswith("onnxruntime")
    assert detector.spec.architecture == "gelan-t" and detector.spec.batch_size is None
    size = detector.spec.image_size
    for batch in (1, 2):
      outputs = detector(np.zeros((batch, size, size, 3), np.uint8))
      assert outputs["count"].shape == (batch,)
      assert outputs["boxes_xyxy_px"].shape == (batch, detector.spec.max_det, 4)
