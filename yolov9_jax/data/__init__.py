"""Input pipeline: sources, the official augmentations, batching."""
