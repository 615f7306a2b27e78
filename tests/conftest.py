"""Test setup: fast XLA:CPU convolutions, 8 simulated devices, a persistent compilation cache,
the shared spec."""
import os
import pathlib
import sys

# Must happen before JAX starts. XLA:CPU's default YNN fusion makes conv weight-gradients 6-19x
# slower; appending keeps whatever the caller set.
# Eight simulated CPU devices let tests shard batches over a mesh as on a TPU slice.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_experimental_ynn_fusion_type="
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC_DIR = REPO_ROOT.parent / "shared" / "spec"

jax.config.update("jax_compilation_cache_dir", str(REPO_ROOT / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

sys.path.insert(0, str(SPEC_DIR / "golden"))

# Tests too slow for every CI run: the FSDP variant of the sharded train step compiles for
# about 6 minutes on a 2-core CPU. YOLOV9_SLOW_TESTS=1 python -m pytest ... runs them too.
slow_test = pytest.mark.skipif(
    os.environ.get("YOLOV9_SLOW_TESTS") != "1",
    reason="slow on a 2-core CPU (minutes of compilation): set YOLOV9_SLOW_TESTS=1 to run it")


# The test files that take many minutes, started first. pytest-xdist hands each worker whole
# files (--dist loadfile) in collection order (--no-loadscope-reorder in pytest.ini; by default it
# orders files by their number of tests): a long file started last is a tail the other worker
# cannot share. In the fresh-clone CI run of 2026-12-07 test_train_loop.py (about 1450 s of
# tests), among the last by test count, ran alone for the suite's final 19 minutes of 54.
LONGEST_FILES_FIRST = ("test_train_loop.py", "test_training.py", "test_custom_data.py",
                       "test_tpu_plan.py", "test_gcs.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)
  items.sort(key=rank)  # stable: the order inside a file, and of the other files, stays


@pytest.fixture(scope="session")
def spec_dir():
  if not SPEC_DIR.is_dir():
    pytest.fail(f"the official spec is missing: expected {SPEC_DIR} (shared/ beside the repo)")
  return SPEC_DIR


@pytest.fixture(scope="session")
def gelan_t_20_classes():
  """gelan-t with 20 classes, freshly initialised: (model, variables). Compiling an init takes
  about 30 s on 2 cores with the default threefry PRNG, so the test files share this one, drawn
  with the 2x faster-compiling unsafe_rbg (the init rules under test do not depend on it)."""
  import jax.numpy as jnp

  from yolov9_jax import models
  model = models.build("gelan-t", num_classes=20)
  key = jax.random.key(0, impl="unsafe_rbg")
  variables = jax.jit(lambda: model.init(key, jnp.zeros((1, 64, 64, 3)), train=False))()
  return model, variables


def _subprocess_slot_files(tmp_path_factory):
  # Every worker's base temp lies in one run folder (pytest-N/popen-gwK): the slots are there.
  run_folder = tmp_path_factory.getbasetemp().parent
  return [run_folder / f"subprocess_slot_{index}.lock" for index in range(2)]


@pytest.fixture
def a_subprocess_slot(tmp_path_factory):
  """For tests that run one program at a time in a subprocess (a run beside a storage emulator,
  README's commands, the newcomer's table, the TPU plan, the bench): one of two slots, so two such
  tests may run at once, one per pytest worker, as two compiling processes on two cores. A worker
  that finds both slots taken waits. When these tests took strict turns, a worker blocked on the
  turn idled while the other ran: 1150 s of waits in one CI run whose tests took 2665 s."""
  import fcntl
  import time
  files = [open(path, "a") for path in _subprocess_slot_files(tmp_path_factory)]
  try:
    while True:
      for file in files:
        try:
          fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          continue
        try:
          yield
        finally:
          fcntl.flock(file, fcntl.LOCK_UN)
        return
      time.sleep(0.5)
  finally:
    for file in files:
      file.close()


@pytest.fixture
def every_subprocess_slot(tmp_path_factory):
  """For tests whose subprocesses want the machine to themselves: two jax.distributed processes
  (two of those tests at once put four compiling processes on two cores, each ran past its own
  timeout in CI, and with the workers' own memory they went past this machine's 24 GiB), and
  tests that time a compile or a pool of workers. Both slots, taken in a fixed order."""
  import fcntl
  files = [open(path, "a") for path in _subprocess_slot_files(tmp_path_factory)]
  try:
    for file in files:
      fcntl.flock(file, fcntl.LOCK_EX)
    yield
  finally:
    for file in files:
      file.close()  # closing releases the lock


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
  """After each test file, the compiled programs it left in JAX's and our caches are dropped: a
  worker runs many files, and their executables (the train steps, the detectors) would otherwise
  add up to more than half of this machine's 24 GiB alongside the multi-process tests."""
  yield
  import ctypes
  import gc

  from yolov9_jax.evaluation import evaluator
  evaluator.detector.cache_clear()
  jax.clear_caches()
  gc.collect()
  # Freed memory goes back to the system only when glibc trims its heap; without this a worker's
  # resident size stays near its largest file's peak (11 GB while it ran test_checkpoint.py).
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass
