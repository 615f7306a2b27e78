"""Weights to and from the official PyTorch layout and files."""
from yolov9_jax.interop.state_dict import (class_layer_key, expected_state_dict_shapes,
                                           from_torch_state_dict, to_torch_state_dict)
from yolov9_jax.interop.torch_checkpoint import (MODEL_ATTRIBUTES, UnsafeCheckpointError,
                                                 detect_architecture, export_official_weights,
                                                 load_torch_checkpoint, official_hyperparameters,
                                                 read_state_dict, save_torch_state_dict,
                                                 write_official_checkpoint)

__all__ = ["MODEL_ATTRIBUTES", "UnsafeCheckpointError", "class_layer_key", "detect_architecture", "expected_state_dict_shapes",
           "export_official_weights", "from_torch_state_dict", "load_torch_checkpoint", "official_hyperparameters",
           "read_state_dict", "save_torch_state_dict", "to_torch_state_dict",
           "write_official_checkpoint"]
