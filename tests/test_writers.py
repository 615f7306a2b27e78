"""A run's metrics through CLU's writers: TensorBoard events and metrics.jsonl on process 0, the
log only on the others; the chatty libraries' INFO lines dropped, their warnings kept."""
import json
import logging as python_logging

import numpy as np
import tensorflow as tf
from absl import logging

from yolov9_jax.training import writers


def _tags(event_dir):
  tags = {}
  for path in tf.io.gfile.glob(str(event_dir / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags.setdefault(value.tag, []).append(event.step)
  return tags


def test_process_zero_writes_tensorboard_and_jsonl_other_processes_only_log(tmp_path):
  writer = writers.create(tmp_path / "main", is_main_process=True)
  writer.write_scalars(2, {"train/box": np.float32(1.5), "train/lr": 0.01})
  writer.write_scalars(4, {"eval/AP50": 0.25})
  writer.write_images(4, {"validation/0": np.zeros((16, 24, 3), np.uint8)})
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / "main" / writers.METRICS_FILE).read_text().splitlines()]
  assert rows == [{"step": 2, "train/box": 1.5, "train/lr": 0.01}, {"step": 4, "eval/AP50": 0.25}]
  tags = _tags(tmp_path / "main" / writers.TENSORBOARD_DIR)
  assert tags["train/box"] == [2] and tags["eval/AP50"] == [4] and tags["validation/0"] == [4]

  other = writers.create(tmp_path / "other", is_main_process=False)
  other.write_scalars(2, {"train/box": 1.5})
  other.close()
  assert not (tmp_path / "other").exists()


def test_library_info_lines_are_dropped_and_warnings_kept():
  writers.log_at_info_without_chatty_libraries()
  writers.log_at_info_without_chatty_libraries()  # idempotent: one filter
  handler = logging.get_absl_handler()
  assert logging.get_verbosity() == logging.INFO
  assert sum(isinstance(f, writers._DropLibraryInfo) for f in handler.filters) == 1

  def record(pathname, level):
    return python_logging.LogRecord("absl", level, pathname, 1, "message", None, None)

  orbax = "/site-packages/orbax/checkpoint/checkpointer.py"
  assert not handler.filter(record(orbax, python_logging.INFO))
  assert handler.filter(record(orbax, python_logging.WARNING))
  assert handler.filter(record("/site-packages/clu/metric_writers/logging_writer.py", python_logging.INFO))
