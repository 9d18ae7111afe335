"""The release layer: gate, register, publish, deploy and roll back a trained model, without KFP.

`uv run -m release promote|rollback ...` from a shell; the pipeline's components call the same
functions. It uses `training` (the serving package, evaluation, the registry) and nothing else of
this project.
"""
