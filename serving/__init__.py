"""Serving: the model package the pipeline publishes and the predictor loads."""
