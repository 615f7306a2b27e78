"""A new architecture is a new table and nothing else: registered in ``models.ARCHITECTURES`` (what
an edit of models/architectures.py does) before the programs start, it trains, evaluates, draws
detections and exports through the command-line programs, with no other file touched."""
import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO_ROOT

# A narrower stem than gelan-t's: a table that no other file of the project knows.
_RUN_WITH_NEW_TABLE = textwrap.dedent("""
    import runpy, sys
    sys.path.insert(0, {repo!r})
    from yolov9_jax.models import architectures
    rows = list(architectures.ARCHITECTURES["gelan-t"])
    rows[0] = (-1, "Conv", (8, 3, 2))
    architectures.ARCHITECTURES["gelan-n"] = tuple(rows)
    sys.argv = {argv!r}
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


# A new table's programs miss the compilation cache: unoptimised code generation halves their
# compile time, and they run a few small batches only.
_ENV = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"}


def _run(program, *flags, timeout=900):
  argv = [str(REPO_ROOT / program), *flags]
  done = subprocess.run([sys.executable, "-c", _RUN_WITH_NEW_TABLE.format(repo=str(REPO_ROOT), argv=argv)],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=_ENV)
  assert done.returncode == 0, f"{program}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
  return done.stdout


def test_an_eleventh_architecture_trains_evaluates_detects_and_exports(tmp_path,
                                                                    a_subprocess_slot):
  data_dir, workdir = tmp_path / "data", tmp_path / "run"
  out = _run("train.py", "--config=configs/shapes_demo.py", f"--workdir={workdir}",
             "--config.model.name=gelan-n", f"--config.data.data_dir={data_dir}",
             "--config.data.shapes.num_train=32", "--config.data.shapes.num_val=8",
             "--config.data.shapes.image_hw=(64, 64)", "--config.augment.image_size=64",
             "--config.augment.max_boxes=16", "--config.augment.workers=0",
             "--config.train.batch_size=8", "--config.train.epochs=1",
             "--config.train.log_every_steps=2", "--config.train.checkpoint_every_steps=4",
             "--config.optimizer.nominal_batch_size=8", "--config.eval.batch_size=8",
             "--config.eval.num_images_logged=2")
  assert "gelan-n on 8 validation images: mAP@0.5" in out, out[-2000:]
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["name"] == "gelan-n"

  dataset = "shapes_32_8_64x64_seed0"
  raw = data_dir / "raw" / dataset / "validation"
  out = _run("eval.py", "--model=gelan-n", f"--weights={workdir}", f"--data_dir={data_dir}",
             f"--dataset={dataset}", "--image_size=64", "--batch_size=8",
             f"--annotations={raw / 'annotations.json'}", f"--out_dir={tmp_path / 'eval'}")
  assert "Average Precision" in out and (tmp_path / "eval" / "predictions.json").exists()

  out = _run("detect.py", "--model=gelan-n", f"--weights={workdir}",
             "--class_names=circle,square,triangle", "--image_size=64",
             f"--out_dir={tmp_path / 'detect'}", str(raw / "images"))
  assert "8 images" in out and (tmp_path / "detect" / "detections.json").exists()

  _run("export.py", f"--checkpoint={workdir}", "--architecture=gelan-n",
       f"--output={tmp_path / 'exported' / 'gelan-n'}")
  assert (tmp_path / "exported" / "gelan-n.pt").exists()
  assert (tmp_path / "exported" / "gelan-n.safetensors").exists()
