"""The experiment harness: data, models, methods, training loop, checkpoints, reports."""
