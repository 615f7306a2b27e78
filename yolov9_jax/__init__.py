"""YOLOv9 (GELAN + PGI) in JAX/Flax."""
