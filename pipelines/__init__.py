"""Kubeflow Pipelines v2: the steps from data to a served model, and what they call."""
