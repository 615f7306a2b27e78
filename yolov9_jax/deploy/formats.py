"""Writers of the exported detector, one per format; each stores ``DetectorSpec`` as metadata.

- stablehlo: ``jax.export`` of the jitted detector for CPU, CUDA and TPU (symbolic batch when
  ``batch_size`` is None), serialised; ``jax.export.deserialize(bytes).call(images)`` runs it with
  no model code. The metadata is a JSON file beside it (``<file>.json``): the serialised form has
  no field for it.
- saved_model: ``jax2tf.convert`` (native serialisation: the same StableHLO inside one
  XlaCallModule op) as the ``serving_default`` signature ``images -> outputs``; the metadata in
  ``assets.extra/yolov9_jax.json``. Lowered for the CPU (a module lowered for CUDA refuses to run on
  a CPU server).
- tflite: TFLite's converter on a fixed-batch SavedModel (TFLite has static shapes); float16 stores
  the weights in float16 (computation stays float32); the metadata as a TFLite metadata entry.
- onnx: jax2onnx, chosen because it converts the JAX graph itself (tf2onnx cannot read the
  XlaCallModule op of a jax2tf SavedModel); NMS as standard ONNX ops (a Loop); the metadata in
  ``metadata_props``.
"""
import contextlib
import logging
import os
import tempfile

import jax
import jax.numpy as jnp

from yolov9_jax import models, paths
from yolov9_jax.deploy import spec as spec_lib
from yolov9_jax.deploy.spec import METADATA_KEY
from yolov9_jax.evaluation import inference
from yolov9_jax.models import heads

STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")


def _images_spec(spec, batch_dimension):
  return jax.ShapeDtypeStruct((batch_dimension, spec.image_size, spec.image_size, 3), jnp.uint8)


def write_stablehlo(function, spec, path):
  batch = spec.batch_size or jax.export.symbolic_shape("batch")[0]
  exported = jax.export.export(jax.jit(function), platforms=STABLEHLO_PLATFORMS)(
      _images_spec(spec, batch))
  paths.user_path(path).write_bytes(exported.serialize())
  paths.user_path(f"{path}.json").write_text(spec.to_json())
  return [path, f"{path}.json"]


def _saved_model(function, spec, directory, batch_size):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel

  size = spec.image_size
  polymorphic = None if batch_size else [f"(batch, {size}, {size}, 3)"]
  converted = jax2tf.convert(function, polymorphic_shapes=polymorphic, with_gradient=False,
                             native_serialization_platforms=("cpu",))
  module = tf.Module()
  module.serve = tf.function(lambda images: converted(images), autograph=False,  # pylint: disable=unnecessary-lambda
                             input_signature=[tf.TensorSpec([batch_size, size, size, 3], tf.uint8,
                                                            name="images")])
  tf.saved_model.save(module, directory, signatures={"serving_default": module.serve})
  extra = paths.user_path(directory) / "assets.extra"
  extra.mkdir(parents=True, exist_ok=True)
  (extra / f"{METADATA_KEY}.json").write_text(spec.to_json())


def write_saved_model(function, spec, path):
  with paths.local_dir(path) as directory:
    _saved_model(function, spec, os.fspath(directory), spec.batch_size)
  return [path]


def write_tflite(function, spec, path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=import-outside-toplevel
  from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as scratch:
    saved_model = os.path.join(scratch, "saved_model")
    _saved_model(function, spec, saved_model, spec.batch_size)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    if spec.dtype == "float16":
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.target_spec.supported_types = [tf.float16]
    flatbuffer = converter.convert()
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    buffer = schema.BufferT()
    buffer.data = list(spec.to_json().encode())
    model.buffers.append(buffer)
    metadata = schema.MetadataT()
    metadata.name = METADATA_KEY
    metadata.buffer = len(model.buffers) - 1
    model.metadata = (model.metadata or []) + [metadata]
    local = os.path.join(scratch, "model.tflite")
    flatbuffer_utils.write_model(model, local)
    paths.user_path(path).write_bytes(paths.user_path(local).read_bytes())
  return [path]


@contextlib.contextmanager
def _quiet(logger_name):
  """jax2onnx logs a warning for each of its example plugins whose optional packages (equinox,
  dm_pix) are not installed; none of them are used here."""
  logger = logging.getLogger(logger_name)
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def write_onnx(function, spec, path):
  with _quiet("jax2onnx"):
    from jax2onnx import to_onnx  # pylint: disable=import-outside-toplevel
    output_names = sorted(spec.output_names)  # the order of a dict's leaves in JAX
    model = to_onnx(function, [_images_spec(spec, spec.batch_size or "batch")],
                    model_name=f"yolov9_jax_{spec.architecture}", input_names=["images"],
                    output_names=output_names, return_mode="proto")
  entry = model.metadata_props.add()
  entry.key, entry.value = METADATA_KEY, spec.to_json()
  paths.user_path(path).write_bytes(model.SerializeToString())
  return [path]


WRITERS = {"stablehlo": write_stablehlo, "saved_model": write_saved_model, "tflite": write_tflite,
           "onnx": write_onnx}


def write(export_format, function, spec, path):
  """Writes ``function`` (``spec.detector_function``) as ``export_format`` to ``path`` (local or
  remote); returns the paths written."""
  target = paths.user_path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if export_format == "saved_model" and target.exists():
    target.rmtree()  # a SavedModel is a folder: no files of an earlier export left in it
  return WRITERS[export_format](function, spec, path)


def build_detector(architecture, variables, spec_settings, export_format=None):
  """The folded detector of ``architecture`` from its training ``variables``: (spec, function of
  uint8 images). ``spec_settings``: the ``DetectorSpec`` fields but ``architecture``
  (class_names may be None: label numbers). ``export_format``: also check that it can hold it."""
  model, fused_variables = inference.inference_model(architecture, variables)
  class_names = spec_settings.get("class_names") or [str(i) for i in range(model.num_classes)]
  if len(class_names) != model.num_classes:
    raise ValueError(f"{len(class_names)} class names, the model {model.num_classes} classes")
  spec = spec_lib.DetectorSpec(**{**spec_settings, "architecture": model.architecture,
                                  "class_names": tuple(class_names)})
  models.check_image_size(spec.image_size, "--image_size")
  if export_format is not None:
    anchors = sum((spec.image_size // stride) ** 2 for stride in heads.STRIDES)
    spec_lib.check_request(spec, export_format,
                           anchors * model.num_classes if spec.multi_label else anchors)
  return spec, spec_lib.detector_function(model, fused_variables, spec)


def export_detector(export_format, architecture, variables, spec_settings, output_prefix):
  """Builds the folded detector (``build_detector``) and writes it as ``export_format`` to
  ``output_prefix`` + the format's suffix. Returns (spec, paths written)."""

  if export_format not in spec_lib.FORMATS:
    raise ValueError(f"unknown format {export_format!r}: one of pt, {', '.join(spec_lib.FORMATS)}")
  spec, function = build_detector(architecture, variables, spec_settings, export_format)
  path = f"{output_prefix}{spec_lib.FORMATS[export_format]}"
  return spec, write(export_format, function, spec, path)
