"""Mask R-CNN training: data, model, Ray Train loop, evaluation and MLflow tracking."""
