"""The train step compiles for a TPU slice on this CPU machine (XLA:TPU from the libtpu package,
no TPU): per-chip memory from the TPU compiler, replicated and with shard_state (FSDP)."""
import importlib.util
import os
import subprocess
import sys
import json

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="needs the libtpu package (requirements-test.txt: libtpu==0.0.42.1, the one jax 0.10.2's "
           "[tpu] extra takes), which could not be installed here")


def _plan(*flags):
  # A process of its own: the CPU stays the default backend (JAX_PLATFORMS=cpu), and XLA_FLAGS
  # meant for XLA:CPU (the simulated devices) stay out of the TPU compiler.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  done = subprocess.run([sys.executable, "-m", "yolov9_jax.tpu_plan", "--topology=v5e:2x2",
                         "--model=gelan-t", "--batch_size=8", "--image_size=64", "--max_boxes=16",
                         *flags], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_train_step_compiles_for_a_tpu_slice_and_fsdp_cuts_the_state_per_chip():
  replicated, sharded = _plan(), _plan("--shard_state")
  for record in (replicated, sharded):
    assert record["chips"] == 4 and record["images_per_chip"] == 2
    assert record["fits"] and 0 < record["planned_bytes_per_chip"] < record["hbm_bytes_per_chip"]
    assert record["flops_per_chip"] > 0 and record["bytes_accessed_per_image"] > 0
  # gelan-t's state (weights, EMA, momentum, gradient sum: ~2.4 M floats each) is most of the
  # arguments; FSDP keeps a quarter of its vectors on each of the 4 chips.
  state_floats = replicated["argument_bytes"] / 4
  assert state_floats > 4 * 2.4e6
  assert sharded["argument_bytes"] < 0.4 * replicated["argument_bytes"]
