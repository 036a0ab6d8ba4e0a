"""From a model reference to a checked checkpoint: locate, Hub, layouts, weights, convert."""
