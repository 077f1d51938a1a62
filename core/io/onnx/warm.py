"""Torch's one-time cost of the ``meta`` device, paid on import: one op there.

:mod:`core.io.onnx.bounds` sizes folded ops on the ``meta`` device; the first such op in a process imports what
torch needs for it (~800 modules, sympy among them: ~2 s). The validation fork server imports this module
(``api.isolation.PRELOAD``) so that each validation process it forks starts with them loaded.
"""

from __future__ import annotations

import torch

_ = (torch.ones(2, device="meta") + 1).index_select(0, torch.zeros(1, dtype=torch.long, device="meta"))
