"""XLA flags that must be set before JAX starts (import this module, not jax, first)."""
import importlib.metadata
import os


def use_fast_cpu_convolutions():
  """XLA:CPU's default YNN fusion makes convolution weight gradients 6-19x slower and the folded
  detector ~25 % slower (train.py, eval.py, detect.py, bench call this); switch it off.
  The flag exists only where the CPU backend is the one in use, so it is left out when an
  accelerator plugin is installed. Appends to XLA_FLAGS, keeping what the caller set."""
  if any(d.metadata["Name"].startswith(("jax-cuda", "jax_cuda", "libtpu"))
         for d in importlib.metadata.distributions()):
    return
  flag = "--xla_cpu_experimental_ynn_fusion_type="
  if flag not in os.environ.get("XLA_FLAGS", "").split():
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
