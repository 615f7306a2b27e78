"""Inference and evaluation: NMS on the device."""
