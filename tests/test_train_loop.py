"""train.py end to end on a tiny shapes run: it learns the official way, resumes exactly after a
SIGTERM, stops on repeated non-finite steps, rejects bad config values, fine-tunes."""
import importlib
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import train  # noqa: E402
from configs import coco, shapes_demo  # noqa: E402
from yolov9_jax import interop, weights  # noqa: E402
from yolov9_jax.data import sources  # noqa: E402
from yolov9_jax.training import checkpoint, config_checks  # noqa: E402
from yolov9_jax.training import state as train_state  # noqa: E402


def _tiny_config(data_dir):
  """gelan-t on 32 shapes images at 64 px, batch 8 (one per simulated device), 3 epochs of 4."""
  config = shapes_demo.get_config()
  config.data.data_dir = str(data_dir)
  config.data.shapes.update(num_train=32, num_val=8, image_hw=(64, 64))
  config.augment.update(image_size=64, max_boxes=16, close_mosaic_epochs=1, workers=0)
  config.train.update(batch_size=8, epochs=3, log_every_steps=2, checkpoint_every_steps=4)
  config.optimizer.update(nominal_batch_size=8)
  config.eval.update(batch_size=8, num_images_logged=2)
  return config


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """12 steps without interruption: (config, final state, evaluation, workdir)."""
  root = tmp_path_factory.mktemp("train")
  config = _tiny_config(root / "data")
  state, result = train.train(config, root / "straight")
  return config, jax.device_get(state), result, root / "straight"


def test_a_run_writes_checkpoints_logs_and_the_batch_grid(straight_run):
  config, state, result, workdir = straight_run
  assert int(state.iteration) == 12 and int(state.ema_updates) == 12  # accumulate 1: every step
  assert (workdir / "train_batch0.png").exists() and (workdir / "config.json").exists()
  assert any((workdir / "tensorboard").iterdir())
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert any('"train/box"' in line for line in lines) and any('"eval/AP50"' in line for line in lines)
  assert set(result.metrics) >= {"AP", "AP50", "table"}
  assert checkpoint.Checkpoints(workdir).latest_step() == 12
  assert np.isfinite(state.params).all() and not np.array_equal(state.params, state.ema_params)


def test_eval_script_evaluates_the_trained_workdir(straight_run, capsys):
  config, _, result, workdir = straight_run
  eval_script = importlib.import_module("eval")
  data = config.data.shapes
  evaluated = eval_script.main([
      "eval.py", "--model=gelan-t", f"--weights={workdir}", f"--data_dir={config.data.data_dir}",
      f"--dataset=shapes_{data.num_train}_{data.num_val}_64x64_seed0", "--image_size=64",
      "--batch_size=8", f"--out_dir={workdir / 'eval'}",
      f"--annotations={pathlib.Path(config.data.data_dir) / 'raw' / f'shapes_{data.num_train}_{data.num_val}_64x64_seed0' / 'validation' / 'annotations.json'}"])
  assert "Average Precision" in capsys.readouterr().out
  assert evaluated.metrics["AP"] == pytest.approx(result.metrics["AP"], abs=1e-9)  # the same EMA weights
  for name in ("predictions.json", "per_class_ap.csv", "pr_curve.png", "confusion_matrix.png"):
    assert (workdir / "eval" / name).exists()


class _SigtermAfter:
  """A training source that sends this process SIGTERM once ``reads`` examples were read, as a
  preempted VM's shutdown would, at a step the run does not know in advance."""

  def __init__(self, source, reads):
    self.source, self.left = source, reads

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    self.left -= 1
    if self.left == 0:
      os.kill(os.getpid(), signal.SIGTERM)
    return self.source[index]


def test_sigterm_saves_and_the_resumed_run_ends_bit_identical(straight_run, tmp_path, monkeypatch):
  config, straight_state, _, workdir = straight_run
  open_datasets = sources.open_datasets

  def preempted_datasets(data_config):
    datasets = open_datasets(data_config)
    datasets.train = _SigtermAfter(datasets.train, reads=60)  # mid-run: a step has ~32 reads
    return datasets

  monkeypatch.setattr(sources, "open_datasets", preempted_datasets)
  state, result = train.train(config, tmp_path)
  assert result is None  # preempted: saved and returned normally (exit status 0)
  stopped_at = int(state.iteration)
  assert 0 < stopped_at < 12 and checkpoint.Checkpoints(tmp_path).latest_step() == stopped_at
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

  monkeypatch.setattr(sources, "open_datasets", open_datasets)
  resumed, _ = train.train(config, tmp_path)
  resumed = jax.device_get(resumed)
  assert int(resumed.iteration) == 12
  for name in ("params", "batch_stats", "ema_params", "ema_batch_stats"):
    np.testing.assert_array_equal(getattr(resumed, name), getattr(straight_state, name), err_msg=name)


def test_a_truncated_newest_checkpoint_resumes_from_the_one_before(straight_run, tmp_path, capsys):
  config, straight_state, _, workdir = straight_run
  shutil.copytree(workdir / checkpoint.LAST, tmp_path / checkpoint.LAST)
  newest = tmp_path / checkpoint.LAST / "12" / "state"
  data_file = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data_file.write_bytes(data_file.read_bytes()[:1000])  # a copy cut short by a full disk
  resumed, _ = train.train(config, tmp_path)
  output = capsys.readouterr().out
  assert f"checkpoint {tmp_path / checkpoint.LAST / '12'} does not read back" in output
  assert "at step 8" in output
  assert len(list((tmp_path / checkpoint.DAMAGED).iterdir())) == 1
  resumed = jax.device_get(resumed)
  for name in ("params", "batch_stats", "ema_params", "ema_batch_stats"):
    np.testing.assert_array_equal(getattr(resumed, name), getattr(straight_state, name), err_msg=name)


def test_repeated_nonfinite_steps_stop_the_run_with_the_checkpoint_intact(straight_run, tmp_path,
                                                                           monkeypatch):
  config, _, _, _ = straight_run
  config = config.copy_and_resolve_references()
  config.train.max_consecutive_nonfinite = 2
  jit_train_step = train.sharding.jit_train_step

  def diverging_after_step_4(step_fn, state, mesh, split=None):
    compiled = jit_train_step(step_fn, state, mesh, split)

    def step(state, batch):  # the device reports non-finite steps from iteration 5 on
      iteration = int(state.iteration)
      state, metrics = compiled(state, batch)
      if iteration >= 5:
        metrics = {**metrics, "consecutive_nonfinite": jnp.asarray(iteration - 4)}
      return state, metrics

    return step

  monkeypatch.setattr(train.sharding, "jit_train_step", diverging_after_step_4)
  with pytest.raises(SystemExit, match="2 consecutive steps had a non-finite loss"):
    train.train(config, tmp_path)
  checkpoints = checkpoint.Checkpoints(tmp_path)
  assert checkpoints.latest_step() == 4
  checkpoints.close()


def test_bad_config_values_are_named():
  config = coco.get_config("gelan-t")
  config.train.batch_size = 12
  with pytest.raises(ValueError, match=r"train.batch_size=12: not divisible by the 8 devices"):
    config_checks.validate(config, num_devices=8)
  config = coco.get_config("gelan-t")
  config.augment.image_size = 630
  with pytest.raises(ValueError, match="augment.image_size=630"):
    config_checks.validate(config, num_devices=1)
  config = coco.get_config("gelan-t")
  config.model.name = "yolov9-x"
  with pytest.raises(ValueError, match="model.name='yolov9-x'"):
    config_checks.validate(config, num_devices=1)
  with pytest.raises(ValueError, match="unknown model 'yolo'"):
    coco.get_config("yolo")
  config.lock()  # as train.py's --config flag (lock_config=True) does: a misspelt field fails
  with pytest.raises(AttributeError, match="batch_sise"):
    config.train.batch_sise = 4


def test_fine_tuning_keeps_everything_but_the_class_head(gelan_t_20_classes):
  model, pretrained = gelan_t_20_classes
  from yolov9_jax import models
  three_classes = models.build("gelan-t", num_classes=3)
  fresh = jax.eval_shape(lambda: three_classes.init(jax.random.key(1), jnp.zeros((1, 64, 64, 3)), train=False))
  fresh = jax.tree.map(lambda s: jnp.full(s.shape, 7.0, s.dtype), fresh)
  variables, reinitialised = train_state.transfer(pretrained, fresh)
  assert reinitialised and all("cv3_" in path for path in reinitialised)
  flat = jax.tree_util.tree_leaves_with_path(variables)
  for path, leaf in flat:
    key = jax.tree_util.keystr(path)
    if any(key in r for r in reinitialised):
      assert (np.asarray(leaf) == 7.0).all()
  kept = [leaf for path, leaf in flat if not any(jax.tree_util.keystr(path) in r for r in reinitialised)]
  assert len(kept) > 0.9 * len(flat) and not any((np.asarray(k) == 7.0).all() for k in kept[:20])
  with pytest.raises(ValueError, match="outside the class head"):
    other = models.build("yolov9-t", num_classes=3)
    train_state.transfer(pretrained, jax.eval_shape(
        lambda: other.init(jax.random.key(1), jnp.zeros((1, 64, 64, 3)), train=False)))


# One of two jax.distributed processes on localhost, with the tiny config (one device each).
_PROCESS_SETUP = """
import os, sys
# Unoptimised code generation halves the compilation of the train step; few steps run anyway.
os.environ["XLA_FLAGS"] = ("--xla_cpu_experimental_ynn_fusion_type= --xla_force_host_platform_device_count=1"
                           " --xla_backend_optimization_level=0")
sys.path[:0] = [{repo!r}, {tests!r}]
import jax
import numpy as np
jax.config.update("jax_compilation_cache_dir", {cache!r})
import train
from test_train_loop import _tiny_config
config = _tiny_config({data_dir!r})
config.update(distributed=True, coordinator_address={address!r}, num_processes=2, process_id={index})
"""


def _start_two_processes(template, config, workdir, **fields):
  """Starts ``template`` (a script) as two jax.distributed processes on localhost."""
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{probe.getsockname()[1]}"
  tests = pathlib.Path(__file__).parent
  processes = []
  for index in range(2):
    script = template.format(repo=str(REPO_ROOT), tests=str(tests), cache=str(REPO_ROOT / ".cache" / "jax"),
                             data_dir=config.data.data_dir, address=address, index=index,
                             workdir=str(workdir), **{k: v.format(index=index) if isinstance(v, str)
                                                      else v for k, v in fields.items()})
    processes.append(subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
  return processes


def _finish(processes, timeout=1200):
  """The processes' outputs, once they ended; any still running after ``timeout`` is killed
  (only our own children, by PID)."""
  try:
    return [p.communicate(timeout=timeout)[0] for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.communicate()


_KILLABLE = _PROCESS_SETUP + """
config.heartbeat_timeout_seconds = {heartbeat}
config.train.update(batch_size=2, epochs=8, steps_per_epoch=3, checkpoint_every_steps=3,
                    shard_state=True)
config.eval.update(batch_size=2, every_epochs=4)
state, result = train.run(config, {workdir!r})
assert jax.process_count() == 2 and len(jax.devices()) == 2
# The COCO evaluation runs on process 0; every process gets its metrics.
print("metrics", result.metrics["AP"], result.metrics["AP50"])
from yolov9_jax import sharding
params, ema_params = sharding.to_host((state.params, state.ema_params))  # gathered: no process holds them
np.save({out!r}, np.stack([params, ema_params]))
print("finished")
"""


def test_two_processes_with_sharded_state_survive_a_killed_one_resume_evaluate_save_best_and_export(
    straight_run, tmp_path, every_subprocess_slot):
  """Two jax.distributed processes with train.shard_state (no process holds the whole state).
  One is killed mid-training: the other stops within the heartbeat timeout, naming the lost one.
  Both rerun: they resume from the last checkpoint (written by both), evaluate (the EMA gathered
  from both), keep the best checkpoint, and end in lockstep; one process then reads the
  checkpoint back whole for export. One scenario, not two: each pair of processes compiles the
  train step for minutes on this machine's two cores."""
  config, _, _, _ = straight_run
  workdir, heartbeat = tmp_path / "run", 10
  outs = {"out": str(tmp_path / "ended{index}.npy"), "heartbeat": heartbeat}
  processes = _start_two_processes(_KILLABLE, config, workdir, **outs)
  try:
    deadline = time.monotonic() + 600
    while not any(p.name.isdigit() and int(p.name) >= 6 for p in (workdir / checkpoint.LAST).glob("*")):
      assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
      time.sleep(0.2)
    processes[1].kill()  # SIGKILL: no handler runs, as when a host disappears
    killed = time.monotonic()
    survivor = _finish(processes[:1], timeout=heartbeat + 60)[0]
    stopped_after = time.monotonic() - killed
  finally:
    for p in processes:  # only our own children, by PID
      if p.poll() is None:
        p.kill()
        p.wait()
  assert processes[0].returncode != 0 and "finished" not in survivor
  assert stopped_after < heartbeat + 30, stopped_after
  # The coordination service names the lost process (task 1) in the survivor's log.
  assert re.search(r"Task 1 heartbeat timeout|stopped sending heartbeats\):\s*1", survivor), survivor[-3000:]
  saved = checkpoint.Checkpoints(workdir)
  last = saved.latest_step()
  saved.close()
  assert 6 <= last < 24

  processes = _start_two_processes(_KILLABLE, config, workdir, **outs)
  outputs = _finish(processes)
  assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  for output in outputs:
    assert f"resumed from {workdir} at step {last}" in output and "finished" in output, output[-3000:]
  # In lockstep: both processes end with the same whole vectors (each gathered them) and both
  # received the final evaluation's metrics, which only process 0 computes.
  ended = [np.load(tmp_path / f"ended{index}.npy") for index in range(2)]
  np.testing.assert_array_equal(ended[0], ended[1])
  assert np.isfinite(ended[0]).all()
  metrics = [[line for line in out.splitlines() if line.startswith("metrics ")] for out in outputs]
  assert len(metrics[0]) == 1 and metrics[0] == metrics[1], metrics
  checkpoints = checkpoint.Checkpoints(workdir)
  assert checkpoints.latest_step() == 24 and set(checkpoints.best.all_steps()) <= {12, 24}
  assert checkpoints.best.all_steps()
  checkpoints.close()

  # One process reads the checkpoint the two wrote (it names devices this process lacks).
  name, variables, meta = checkpoint.load_model_variables(workdir)
  assert name == "gelan-t" and meta["config"]["train"]["shard_state"]
  flat_ema = train_state.Layout.of(variables).flatten_params(variables["params"])
  np.testing.assert_array_equal(np.asarray(flat_ema), ended[0][1][:flat_ema.size])
  exported_variables, _ = weights.load(workdir, "gelan-t")
  written = interop.export_official_weights("gelan-t", exported_variables, tmp_path / "out" / "gelan-t")
  _, loaded, _ = interop.load_torch_checkpoint(written[0])
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(got, want)
