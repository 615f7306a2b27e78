"""Weights to and from the official PyTorch layout."""
from yolov9_jax.interop.state_dict import (expected_state_dict_shapes, from_torch_state_dict,
                                           to_torch_state_dict)

__all__ = ["expected_state_dict_shapes", "from_torch_state_dict", "to_torch_state_dict"]
