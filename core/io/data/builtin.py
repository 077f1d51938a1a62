"""Datasets that ship with the service: scikit-learn's handwritten digits, flat or as 1×8×8 images."""

from __future__ import annotations

import functools

import numpy as np
import torch

from core.errors import InvalidInput
from core.io.data.dataset import Dataset, field_error

BUILTIN_DATASETS = ("digits", "digits-image")


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # here: importing scikit-learn costs ~0.9 s and ~80 MiB

    d = load_digits()
    x = (np.asarray(d.data, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    y = np.asarray(d.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def builtin_dataset(name: str) -> Dataset:
    """A bundled dataset: ``"digits"`` (1797×64 in [0, 1], 10 classes) or ``"digits-image"`` (1×8×8)."""
    if name not in BUILTIN_DATASETS:
        raise InvalidInput(
            f"unknown built-in dataset {name!r}: available are {list(BUILTIN_DATASETS)}",
            errors=[field_error(["dataset"], "unknown built-in dataset")],
        )
    x, y = _digits_arrays()
    xt = torch.tensor(x)
    if name == "digits-image":
        xt = xt.reshape(-1, 1, 8, 8)
    return Dataset(x_train=xt, y_train=torch.tensor(y), num_classes=10)
