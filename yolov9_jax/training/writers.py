"""Where a run's metrics go: CLU's metric writers, as the Flax examples use them. Process 0 writes
TensorBoard summaries (scalars and images) under ``<workdir>/tensorboard`` and one JSON line per
write of scalars to ``<workdir>/metrics.jsonl`` (for scripts that do not read TensorBoard files),
and logs the values; every other process only logs them."""
import json
import logging as python_logging

from absl import logging
from clu import metric_writers

from yolov9_jax import paths

TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"

# Libraries that log every checkpoint save and dataset read at INFO; their warnings still show.
_CHATTY_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/etils/", "/jax/_src/")


class JsonlWriter(metric_writers.MetricWriter):
  """Scalars as JSON lines, ``{"step": N, "<name>": value, ...}``; other kinds of values are left
  to the TensorBoard writer."""

  def __init__(self, path):
    self.path = path

  def write_scalars(self, step, scalars):
    line = {"step": int(step), **{name: float(value) for name, value in scalars.items()}}
    paths.append_text(self.path, json.dumps(line) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create(workdir, is_main_process):
  """The run's writer: TensorBoard, metrics.jsonl and the log on process 0, the log elsewhere.
  Call ``close()`` when the run ends: it waits for the asynchronous writes."""
  if not is_main_process:
    return metric_writers.create_default_writer(just_logging=True)
  workdir = paths.user_path(workdir)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(str(workdir / TENSORBOARD_DIR)),
      JsonlWriter(workdir / METRICS_FILE)])


class _DropLibraryInfo(python_logging.Filter):
  def filter(self, record):
    return record.levelno >= python_logging.WARNING or not any(
        part in record.pathname for part in _CHATTY_LIBRARIES)


def log_at_info_without_chatty_libraries():
  """absl logging at INFO for the run's own messages (the metric writers log there); the INFO
  messages of orbax, TFDS, etils and JAX's internals are dropped."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
