"""The model as every stage sees it: typed config, architecture, the serving package (reader, format,
package -> network), the graph's runtime, NumPy pre- and post-processing, images, labels, masks, reference
statistics, signatures, visualisation, object storage, waiting and logging.

It imports nothing else of the project, and only its architecture (`maskrcnn.model`) and eager runner
(`maskrcnn.eager`) import torch at the top: `training/` makes a model with it, `release/` ships one,
`serving/` and `batch/` run one.
"""
