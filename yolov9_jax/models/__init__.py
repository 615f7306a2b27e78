"""GELAN / YOLOv9 detectors in Flax: ``build(name, num_classes)`` returns a ``flax.linen.Module``;
the facts other packages need about a model (its variables' shapes, its head and class layer, the
gelan layout of its main branch, the input multiple) are asked of this package."""
from yolov9_jax.models.architectures import ARCHITECTURES
from yolov9_jax.models.yolo import (INPUT_MULTIPLE, YOLO, abstract_variables, build,
                                    check_image_size, gelan_counterpart, head_branches, head_layer,
                                    init_variables, main_branch_layers, num_classes_of)

__all__ = ["ARCHITECTURES", "INPUT_MULTIPLE", "YOLO", "abstract_variables", "build",
           "check_image_size", "gelan_counterpart", "head_branches", "head_layer",
           "init_variables", "main_branch_layers", "num_classes_of"]
