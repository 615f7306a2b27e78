"""The inference form of a detector: the main branch only, BatchNorm folded into the convolutions.

``prune_to_main_branch`` does what the official reparameterisation does: a yolov9-X model becomes
the gelan-X layout (main-branch layers renumbered, the head's cv4/cv5 becoming cv2/cv3; FACTS.md
§1.5). ``fold_batchnorm`` folds every BatchNorm into its conv (w * g / sqrt(var + eps),
b - mean * g / sqrt(var + eps)) and merges each RepConvN's 3x3 and 1x1 branches into one 3x3 conv.
"""
import jax.numpy as jnp

from yolov9_jax import models
from yolov9_jax.evaluation import nms
from yolov9_jax.models.layers import BN_EPSILON


def _layer_mapping(architecture):
  """{layer index in ``architecture``: layer index in its gelan counterpart}, head excluded."""
  target = models.gelan_counterpart(architecture)
  source_rows, target_rows = models.ARCHITECTURES[architecture], models.ARCHITECTURES[target]
  kept = [i for i in models.main_branch_layers(architecture) if source_rows[i][1] != "Silence"]
  target_layers = [i for i in range(len(target_rows) - 1) if target_rows[i][1] != "Silence"]
  if len(kept) != len(target_layers) or any(
      source_rows[i][1:] != target_rows[j][1:] for i, j in zip(kept, target_layers)):
    raise ValueError(f"the main branch of {architecture} does not match the {target} layout")
  return dict(zip(kept, target_layers))


def prune_to_main_branch(architecture, variables):
  """(gelan architecture name, its variables) holding only what the main branch computes."""
  target = models.gelan_counterpart(architecture)
  if target == architecture:
    return architecture, variables
  mapping = _layer_mapping(architecture)
  source_head = len(models.ARCHITECTURES[architecture]) - 1
  target_head = len(models.ARCHITECTURES[target]) - 1
  renamed = {"cv4": "cv2", "cv5": "cv3"}  # the main head; the aux head (cv2/cv3) is dropped
  pruned = {}
  for collection, tree in variables.items():
    pruned[collection] = {f"model_{mapping[int(name[6:])]}": value for name, value in tree.items()
                          if int(name[6:]) in mapping}
    head = tree[f"model_{source_head}"]
    pruned[collection][f"model_{target_head}"] = {
        renamed[name[:3]] + name[3:]: value for name, value in head.items() if name[:3] in renamed}
  return target, pruned


def _fold(conv, bn, stats, dtype):
  multiplier = bn["scale"].astype(dtype) / jnp.sqrt(stats["var"].astype(dtype) + BN_EPSILON)
  return {"kernel": conv["kernel"].astype(dtype) * multiplier,
          "bias": bn["bias"].astype(dtype) - stats["mean"].astype(dtype) * multiplier}


def _fold_tree(params, stats, dtype):
  if "bn" in params:  # a Conv block: conv (no bias) + BatchNorm
    return {"conv": _fold(params["conv"], params["bn"], stats["bn"], dtype)}
  if "conv1" in params and "conv2" in params:  # RepConvN: 3x3 and 1x1 branches, summed
    branch_3x3 = _fold(params["conv1"]["conv"], params["conv1"]["bn"], stats["conv1"]["bn"], dtype)
    branch_1x1 = _fold(params["conv2"]["conv"], params["conv2"]["bn"], stats["conv2"]["bn"], dtype)
    kernel = branch_3x3["kernel"] + jnp.pad(branch_1x1["kernel"], ((1, 1), (1, 1), (0, 0), (0, 0)))
    return {"conv": {"conv": {"kernel": kernel, "bias": branch_3x3["bias"] + branch_1x1["bias"]}}}
  return {name: _fold_tree(value, stats.get(name, {}), dtype) if isinstance(value, dict) else value
          for name, value in params.items()}


def fold_batchnorm(variables, dtype=jnp.float32):
  """Variables of the fused model (``models.build(..., fused=True)``): {"params"} only."""
  return {"params": _fold_tree(variables["params"], variables["batch_stats"], dtype)}


def inference_model(architecture, variables, dtype=jnp.float32):
  """(fused main-branch model, its variables) computing ``architecture``'s main output."""
  target, pruned = prune_to_main_branch(architecture, variables)
  model = models.build(target, num_classes=models.num_classes_of(target, pruned), dtype=dtype,
                       fused=True)
  return model, fold_batchnorm(pruned, dtype)


def detection_function(model, conf_threshold, iou_threshold, max_det, multi_label):
  """The detector as a pure function, ``(fused variables, images (B, S, S, 3) uint8 RGB) ->
  nms.Detections`` with boxes in letterboxed input pixels: what eval.py and detect.py jit and
  what export.py serialises (one function, so that every format computes the measured one)."""

  def detect(fused_variables, images_uint8):
    images = images_uint8.astype(model.dtype) / 255
    predictions = model.apply(fused_variables, images, train=False)["main"]
    # bfloat16 boxes would be off by pixels at 640: NMS and the boxes stay float32.
    return nms.non_max_suppression(predictions.astype(jnp.float32), conf_threshold, iou_threshold,
                                   max_det, multi_label=multi_label)

  return detect
