"""Training: the official recipe's optimizer and schedules, the train state and step, sharding,
checkpoints."""
