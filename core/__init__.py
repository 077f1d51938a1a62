"""Arborist's domain, in four layers (imports point down only; `lint-imports` checks it):

* ``core.service`` — settings, artifact store, job queue, SQL store: what a deployment needs.
* ``core.runs``    — a pruning run: the spec, schedules, fine-tuning, checkpoints, the report.
* ``core.io``      — every parser of untrusted bytes: model files, ONNX, the zoo, datasets, URIs.
* ``core.engine``  — the maths in pure PyTorch: layouts, gradients, curvature, OBS, pruners.

``core.errors`` is shared by all layers: the domain errors and their RFC 9457 problem documents.
"""
