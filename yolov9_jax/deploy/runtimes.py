"""Exported detectors loaded into their own runtimes (JAX for StableHLO, TensorFlow for the
SavedModel, the TFLite interpreter, onnxruntime), each called the same way: uint8 images
(B, S, S, 3) in, ``{output name: numpy array}`` out (``DetectorSpec.output_names``)."""
import json
import os

import numpy as np

from yolov9_jax import paths
from yolov9_jax.deploy.spec import METADATA_KEY, DetectorSpec

SUFFIXES = {".stablehlo": "stablehlo", ".tflite": "tflite", ".onnx": "onnx"}


def format_of(path):
  """The export format of the file or folder at ``path``, or None when it is not one."""
  path = paths.user_path(path)
  if path.suffix in SUFFIXES and path.is_file():
    return SUFFIXES[path.suffix]
  if path.is_dir() and (path / "saved_model.pb").exists():
    return "saved_model"
  return None


class ExportedDetector:
  """``detector(images)`` -> {name: array}; ``detector.spec`` its settings; ``runtime`` names what
  runs it."""

  def __init__(self, spec, run, runtime):
    self.spec, self._run, self.runtime = spec, run, runtime

  def __call__(self, images_uint8):
    images_uint8 = np.asarray(images_uint8)
    expected = (self.spec.image_size, self.spec.image_size, 3)
    if images_uint8.dtype != np.uint8 or images_uint8.shape[1:] != expected or (
        self.spec.batch_size and images_uint8.shape[0] != self.spec.batch_size):
      raise ValueError(f"this detector takes uint8 images of shape "
                       f"({self.spec.batch_size or 'any'}, {', '.join(map(str, expected))}), "
                       f"not {images_uint8.dtype} {images_uint8.shape}")
    return {name: np.asarray(value) for name, value in self._run(images_uint8).items()}


def _stablehlo(path):
  import jax  # pylint: disable=import-outside-toplevel
  spec = DetectorSpec.from_json(paths.user_path(f"{path}.json").read_text())
  exported = jax.export.deserialize(bytearray(paths.user_path(path).read_bytes()))
  return ExportedDetector(spec, jax.jit(exported.call), f"jax {jax.__version__} (StableHLO)")


def _saved_model(path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  spec = DetectorSpec.from_json(
      (paths.user_path(path) / "assets.extra" / f"{METADATA_KEY}.json").read_text())
  serve = tf.saved_model.load(os.fspath(path)).signatures["serving_default"]

  def run(images):
    return {name: value.numpy() for name, value in serve(images=tf.constant(images)).items()}
  return ExportedDetector(spec, run, f"tensorflow {tf.__version__} (SavedModel)")


def _tflite(path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=import-outside-toplevel
  content = paths.user_path(path).read_bytes()
  model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
  entries = {bytes(entry.name).decode(): entry.buffer for entry in model.metadata or []}
  if METADATA_KEY not in entries:
    raise ValueError(f"{path}: a TFLite file without yolov9_jax metadata")
  spec = DetectorSpec.from_json(bytes(model.buffers[entries[METADATA_KEY]].data).decode())
  interpreter = tf.lite.Interpreter(model_content=content)
  runner = interpreter.get_signature_runner("serving_default")
  return ExportedDetector(spec, lambda images: runner(images=images),
                          f"tensorflow {tf.__version__} (TFLite interpreter)")


def _onnx(path):
  import onnxruntime  # pylint: disable=import-outside-toplevel
  with paths.local_file(path) as local:
    session = onnxruntime.InferenceSession(os.fspath(local), providers=["CPUExecutionProvider"])
  metadata = session.get_modelmeta().custom_metadata_map
  if METADATA_KEY not in metadata:
    raise ValueError(f"{path}: an ONNX file without yolov9_jax metadata")
  spec = DetectorSpec.from_json(metadata[METADATA_KEY])
  names = [output.name for output in session.get_outputs()]
  return ExportedDetector(spec, lambda images: dict(zip(names, session.run(names, {"images": images}))),
                          f"onnxruntime {onnxruntime.__version__}")


LOADERS = {"stablehlo": _stablehlo, "saved_model": _saved_model, "tflite": _tflite, "onnx": _onnx}


def load(path):
  """The exported detector at ``path`` (.stablehlo, .tflite, .onnx or a SavedModel folder)."""
  export_format = format_of(path)
  if export_format is None:
    raise ValueError(f"{path}: not an exported detector (.stablehlo, .tflite, .onnx or a "
                     "SavedModel folder)")
  return LOADERS[export_format](path)


def describe(detector):
  """A line about ``detector`` for logs."""
  spec = detector.spec
  return json.dumps({"runtime": detector.runtime, "architecture": spec.architecture,
                     "image_size": spec.image_size, "batch_size": spec.batch_size,
                     "nms": spec.nms})
