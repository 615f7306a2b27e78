"""Training: the official recipe's optimizer and schedules, the train state and step,
checkpoints. Where arrays live is ``yolov9_jax.sharding``'s."""
