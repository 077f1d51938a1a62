"""Everything that parses untrusted bytes: model files, ONNX, the architecture zoo, datasets and URIs.

Nothing here imports ``core.service`` or ``core.runs``; audit this package to audit the input surface.
"""
