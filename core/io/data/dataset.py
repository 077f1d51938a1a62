"""A dataset in memory: training (and optionally validation) tensors, their checks and the train/val split.

Conventions: features are float32, integer labels int64 (float labels stay float32, for regression).
``num_classes`` is ``max(label) + 1`` for integer labels and ``None`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from core.errors import InvalidInput

#: the most classes integer labels may name (a 32-bit signed integer: what ``num_classes`` is stored as, on
#: every database)
MAX_CLASSES = 2**31 - 1


def field_error(loc: list, msg: str, typ: str = "value_error") -> dict:
    """One entry of an error's ``errors`` list: where (``loc``), what (``msg``) and its kind (``type``)."""
    return {"loc": loc, "msg": msg, "type": typ}


@dataclass
class Dataset:
    """Training (and optionally validation) tensors. ``len()`` counts all examples, train + val."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    num_classes: int | None = None
    input_shape: tuple[int, ...] = field(default=())
    #: the named inputs ``x`` packs, in its column order: ((name, per-example shape), ...) (``core.io.onnx.packed``:
    #: a model of several named inputs); None for plain features
    named_inputs: tuple[tuple[str, tuple[int, ...]], ...] | None = None

    def __post_init__(self) -> None:
        if (self.x_val is None) != (self.y_val is None):
            raise InvalidInput("a validation split needs both x_val and y_val")
        _check_pair(self.x_train, self.y_train, "train")
        if self.x_val is not None:
            _check_pair(self.x_val, self.y_val, "val")
            if tuple(self.x_val.shape[1:]) != tuple(self.x_train.shape[1:]):
                raise InvalidInput(
                    f"validation inputs have shape {tuple(self.x_val.shape[1:])} per example, "
                    f"training inputs {tuple(self.x_train.shape[1:])}",
                    errors=[field_error(["x_val"], "per-example shape differs from x")],
                )
            if self.y_val.is_floating_point() != self.y_train.is_floating_point() or (
                tuple(self.y_val.shape[1:]) != tuple(self.y_train.shape[1:])
            ):
                raise InvalidInput("validation labels differ in kind or shape from the training labels")
        if not self.input_shape:
            self.input_shape = tuple(int(d) for d in self.x_train.shape[1:])
        else:
            self.input_shape = tuple(int(d) for d in self.input_shape)
            if self.input_shape != tuple(self.x_train.shape[1:]):
                raise InvalidInput(
                    f"input_shape {self.input_shape} does not match the data {tuple(self.x_train.shape[1:])}"
                )
        if not self.y_train.is_floating_point():
            top = int(self.y_train.max())
            if self.y_val is not None:
                top = max(top, int(self.y_val.max()))
            if self.num_classes is None:
                self.num_classes = top + 1
            elif top >= int(self.num_classes):
                raise InvalidInput(f"labels reach {top} but num_classes is {self.num_classes}")

    @property
    def has_val(self) -> bool:
        return self.x_val is not None

    @property
    def num_train(self) -> int:
        return len(self.x_train)

    @property
    def num_val(self) -> int:
        return 0 if self.x_val is None else len(self.x_val)

    def __len__(self) -> int:
        return self.num_train + self.num_val

    def split(self, val_fraction: float, seed: int = 0) -> Dataset:
        """Hold out ``val_fraction`` of the training examples as validation (a seeded permutation).

        A dataset that already has a validation split is returned unchanged: an explicit split wins.
        """
        if not isinstance(val_fraction, (int, float)) or not 0.0 < float(val_fraction) < 1.0:
            raise InvalidInput(
                f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}",
                errors=[field_error(["val_fraction"], "must be in (0, 1)")],
            )
        if self.has_val:
            return self
        n = self.num_train
        n_val = holdout_size(n, val_fraction)
        if n_val >= n:
            raise InvalidInput(f"cannot hold out {val_fraction:.0%} of {n} example(s) and keep any for training")
        gen = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(n, generator=gen)
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        return Dataset(
            x_train=self.x_train[train_idx],
            y_train=self.y_train[train_idx],
            x_val=self.x_train[val_idx],
            y_val=self.y_train[val_idx],
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            named_inputs=self.named_inputs,
        )


def holdout_size(num_train: int, val_fraction: float) -> int:
    """How many of ``num_train`` examples :meth:`Dataset.split` holds out for validation."""
    return max(1, round(num_train * float(val_fraction)))


def max_train_examples(num_examples: int, has_val: bool, val_fraction: float) -> int:
    """An upper bound on the training examples of a run over a dataset of ``num_examples`` (train + val).

    Exact when the dataset has no validation split (a run holds out :func:`holdout_size` of them); with its own
    split, whose size a summary does not record, the split holds at least one example.
    """
    if has_val:
        return max(num_examples - 1, 0)
    return max(num_examples - holdout_size(num_examples, val_fraction), 0)


@dataclass(frozen=True)
class DatasetInfo:
    format: str
    num_examples: int
    input_shape: tuple[int, ...]
    num_classes: int | None
    has_val: bool


def _check_pair(x: Tensor, y: Tensor, split: str) -> None:
    xk, yk = ("x", "y") if split == "train" else ("x_val", "y_val")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InvalidInput(f"{xk} and {yk} must be tensors")
    if x.dim() == 0 or len(x) == 0:
        raise InvalidInput(f"the dataset is empty: {xk} has no examples", errors=[field_error([xk], "no examples")])
    if y.dim() == 0 or len(y) != len(x):
        ny = 0 if y.dim() == 0 else len(y)
        raise InvalidInput(
            f"{xk} has {len(x)} examples but {yk} has {ny} labels",
            errors=[field_error([yk], f"length {ny}, expected {len(x)}")],
        )
    if not x.is_floating_point():
        raise InvalidInput(f"{xk} must be floating point")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum()) if x.dim() > 1 else int((~torch.isfinite(x)).sum())
        raise InvalidInput(
            f"{xk} holds NaN or Inf values in {bad} example(s)",
            errors=[field_error([xk], "NaN or Inf values", "non_finite")],
        )
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()):
            raise InvalidInput(
                f"{yk} holds NaN or Inf values", errors=[field_error([yk], "NaN or Inf values", "non_finite")]
            )
    elif y.dtype == torch.bool or y.is_complex():
        raise InvalidInput(f"{yk} must hold integer or float labels")
    else:
        if y.dim() != 1:
            raise InvalidInput(
                f"integer labels must be one per example, {yk} has shape {tuple(y.shape)}",
                errors=[field_error([yk], "expected shape (N,)")],
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise InvalidInput(
                f"{yk} holds negative labels (min {lo}): class labels must be 0, 1, ..., K-1",
                errors=[field_error([yk], "negative labels")],
            )
        if hi >= MAX_CLASSES:
            raise InvalidInput(
                f"{yk} holds the label {hi}: class labels must be below {MAX_CLASSES} (at most {MAX_CLASSES} classes)",
                errors=[field_error([yk], f"labels must be below {MAX_CLASSES}", "too_large")],
            )
