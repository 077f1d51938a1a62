"""Weights saved under their own module's names: a plain ``nn.Sequential``'s state dict (``0.weight``, ``0.bias``,
``2.weight`` …) for a zoo architecture whose names differ (the MLP's ``layers.1.weight`` …).

Such a file is matched to the architecture by order and shape, never by guessing: its tensors group by module
(the name before the last dot), the groups sort by their ``nn.Sequential`` indices (every module path ends in a
number: ``0``, ``2``, ``features.3``), and the i-th group must hold exactly the tensors (``weight``, ``bias``,
``running_mean`` …) of the architecture's i-th module, with the same shapes. Anything else is no match, and the
upload is refused saying what the architecture expects (:func:`expected_names`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

Shapes = Mapping[str, tuple[int, ...]]
_SHOWN = 8


def _groups(names: list[str]) -> dict[str, dict[str, str]]:
    """{module path: {tensor leaf: full name}} in the order of ``names``."""
    out: dict[str, dict[str, str]] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        out.setdefault(prefix, {})[leaf] = name
    return out


def _index_key(prefix: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in prefix.split("."))


def match_by_order(expected: Shapes, found: Shapes) -> dict[str, str] | None:
    """{name in the file: the architecture's name} when ``found`` is an ``nn.Sequential``'s state dict of the
    architecture ``expected`` (in its state-dict order) by order and shape; None when the names already match or
    there is no such match."""
    if set(found) == set(expected):
        return None
    mine, theirs = _groups(list(expected)), _groups(list(found))
    if len(mine) != len(theirs) or not all(re.search(r"(^|\.)\d+$", p) for p in theirs):
        return None
    mapping: dict[str, str] = {}
    for (_, want), prefix in zip(mine.items(), sorted(theirs, key=_index_key), strict=True):
        have = theirs[prefix]
        if set(have) != set(want) or any(tuple(found[have[k]]) != tuple(expected[want[k]]) for k in want):
            return None
        mapping.update({have[k]: want[k] for k in want})
    return mapping


def expected_names(expected: Shapes) -> str:
    """What an architecture's file must hold, for a refusal: its first names with their shapes."""
    items = [f"{k} {list(v)}" for k, v in list(expected.items())[:_SHOWN]]
    more = len(expected) - _SHOWN
    return ", ".join(items) + (f" (and {more} more)" if more > 0 else "")
