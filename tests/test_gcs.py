"""A run whose work directory and prepared dataset are on gs://, served by a local GCS emulator
(tests/gcs_emulator.py: the GCS JSON API on 127.0.0.1; the real clients, orbax/tensorstore,
TensorFlow's file system under etils.epath and TFDS, and array_record's reader, pointed at it by
their own settings): train, resume, evaluate, export, and every file lands in the bucket."""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

import gcs_emulator

_SCRIPT = """
import os
import signal
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from yolov9_jax import interop, paths, weights
from yolov9_jax.data import sources
import eval as eval_script
import train
from test_train_loop import _tiny_config

# A dataset prepared on one machine and copied to the bucket, as a pod reads it (TFDS writes
# array_record files only to local disks; they read back from gs:// by random access).
config = _tiny_config({local_data!r})
shapes = config.data.shapes
builder, annotations = sources.shapes_builder(config.data.data_dir, shapes.num_train, shapes.num_val,
                                              tuple(shapes.image_hw), shapes.seed)
paths.copy_tree(paths.user_path(builder.data_dir).parent, "gs://test-bucket/tfds/" + builder.name)
paths.user_path("gs://test-bucket/val.json").write_bytes(paths.user_path(annotations).read_bytes())
config.data.update(source="tfds", name=builder.name, data_dir="gs://test-bucket/tfds",
                   eval_annotations="gs://test-bucket/val.json")
# The first run is preempted after step 2: SIGTERM, the notice a TPU VM gets before it goes.
# The rerun, with the same config (and so the same programs: test_train_loop's runs of this
# config leave them in the compilation cache), resumes there and ends at step 12.
create_writer = train.writers.create
def create_writer_preempted_at_step_2(*args):
  writer = create_writer(*args)
  write_scalars = writer.write_scalars
  def write_then_preempt(step, scalars):
    write_scalars(step, scalars)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
  writer.write_scalars = write_then_preempt
  return writer
train.writers.create = create_writer_preempted_at_step_2
state, result = train.train(config, "gs://test-bucket/run")
assert result is None and int(state.iteration) == 2
train.writers.create = create_writer
state, result = train.train(config, "gs://test-bucket/run")
print("trained", int(state.iteration), result.metrics["AP50"])
eval_script.main(["eval.py", "--model=gelan-t", "--weights=gs://test-bucket/run",
                  "--data_dir=gs://test-bucket/tfds", "--dataset=" + builder.name, "--image_size=64",
                  "--batch_size=8", "--annotations=gs://test-bucket/val.json",
                  "--out_dir=gs://test-bucket/eval"])
variables, _ = weights.load("gs://test-bucket/run", "gelan-t")
for path in interop.export_official_weights("gelan-t", variables, "gs://test-bucket/export/gelan-t"):
  print("exported", path)
"""


@pytest.fixture(scope="module")
def gcs_server():
  with gcs_emulator.running() as server:
    yield server


def test_train_resume_evaluate_and_export_on_gs(gcs_server, tmp_path, a_subprocess_slot):
  tests = REPO_ROOT / "tests"
  script = _SCRIPT.format(repo=str(REPO_ROOT), tests=str(tests), local_data=str(tmp_path / "local"))
  done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                        timeout=1200, env={**os.environ, **gcs_emulator.client_env(**gcs_server)})
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
  assert "resumed from gs://test-bucket/run at step 2" in done.stdout
  assert "trained 12" in done.stdout
  assert not (tmp_path / "gs:").exists()  # nothing went to a local folder named "gs:"

  objects = gcs_emulator.list_objects(gcs_server["emulator"])
  for name in ("run/config.json", "run/metrics.jsonl", "run/train_batch0.png",
               "eval/predictions.json", "eval/metrics.json", "eval/per_class_ap.csv",
               "eval/pr_curve.png", "eval/confusion_matrix.png", "export/gelan-t.pt",
               "export/gelan-t.safetensors"):
    assert objects.get(name, 0) > 0, (name, sorted(objects)[:50])
  for prefix in ("run/checkpoints/4/", "run/checkpoints/8/", "run/checkpoints/12/", "run/best/",
                 "run/tensorboard/"):
    assert any(name.startswith(prefix) for name in objects), prefix
  lines = gcs_emulator.read_object(gcs_server["emulator"], "run/metrics.jsonl").decode().splitlines()
  steps = [json.loads(line)["step"] for line in lines]
  # Both runs' lines (2 from the first): the rerun added to the file, which gs:// cannot append to.
  assert steps == sorted(steps) and steps[0] == 2 and 12 in steps
  assert sum("eval/AP" in line for line in lines) == 1
  # The dataset's own category ids (shapes: 1..3), read from its categories.json on gs://.
  predictions = json.loads(gcs_emulator.read_object(gcs_server["emulator"], "eval/predictions.json"))
  assert predictions and {p["category_id"] for p in predictions} <= {1, 2, 3}
  assert any(p["category_id"] == 3 for p in predictions)
