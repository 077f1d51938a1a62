"""The validation child's memory limit (``api.isolation``, issue #12): an allocation past it, in any library, and a
child killed outright are problems with the numbers (413), a child that crashes otherwise is a 422, never a 500;
the limit is the child's alone; a normal validation fits the default with room to spare."""

from __future__ import annotations

import os
import re
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from api.isolation import ValidatorCrashed, memory_limit, run_isolated
from core.errors import InvalidInput, LimitExceeded
from core.io.model_files import ModelInfo, validate_model_file
from core.io.zoo import build_model
from core.service.settings import MiB, Settings

LIMIT = 256 * MiB


def torch_gib() -> int:
    return int(torch.ones(2**28).sum())  # 1 GiB of float32


def numpy_gib() -> int:
    return int(np.ones(2**28, np.float32).sum())


def python_gib() -> int:
    return len(b"\1" * 2**30)


def wrapped_gib() -> int:
    """A library that catches the allocation failure and raises its own error (as data loaders do)."""
    try:
        return torch_gib()
    except RuntimeError as e:
        raise InvalidInput(f"cannot read the file: {e}") from e


def small() -> tuple[int, int]:
    """16 MiB, well within the limit; returns the child's data limit."""
    assert torch.ones(4 * 2**20).sum() == 4 * 2**20
    return resource.getrlimit(resource.RLIMIT_DATA)


def die(sig: int) -> None:
    os.kill(os.getpid(), sig)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def validate_and_measure(path: Path, kwargs: dict) -> tuple[ModelInfo, int, int]:
    """The validation a model upload runs, and the child's data segment and peak RSS growth over it (KiB)."""
    data, rss = status_kib("VmData"), status_kib("VmRSS")
    info = validate_model_file(path, arch="resnet18", arch_kwargs=kwargs)
    return info, status_kib("VmData") - data, status_kib("VmHWM") - rss


@pytest.mark.parametrize(
    "fn, built",
    [
        (torch_gib, r"DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes"),
        (numpy_gib, r"Unable to allocate 1.00 GiB for an array with shape \(268435456,\)"),
        (python_gib, r"MemoryError"),
        (wrapped_gib, r"cannot read the file: DefaultCPUAllocator: can't allocate memory: you tried to allocate"),
    ],
    ids=["torch", "numpy", "python", "wrapped"],
)
def test_allocation_past_the_limit_is_a_limit_problem(fn, built: str) -> None:
    with pytest.raises(LimitExceeded) as ei:
        run_isolated(fn, memory_limit=LIMIT)
    err = ei.value
    assert err.status == 413 and err.type == "limit-exceeded"
    assert err.detail.startswith(
        "validating the file needs more memory than its limit of 256 MiB (ARBORIST_VALIDATION_MEMORY_MB, plus 4 bytes "
        "per byte of the file): "
    ), err.detail
    assert re.search(built, err.detail), err.detail
    assert "enforce fail" not in err.detail
    assert err.errors[0]["loc"] == ["file"]


def test_the_limit_is_the_childs_alone() -> None:
    parent = resource.getrlimit(resource.RLIMIT_DATA)
    soft, hard = run_isolated(small, memory_limit=LIMIT)
    assert soft == hard and LIMIT < soft < LIMIT + 2048 * MiB  # what it started with, plus the limit
    assert resource.getrlimit(resource.RLIMIT_DATA) == parent
    assert run_isolated(small)[0] == parent[0]  # no limit asked: none set


def test_child_killed_is_a_limit_problem() -> None:
    with pytest.raises(LimitExceeded, match=r"killed \(SIGKILL\), most likely by the kernel for lack of memory; "
                       r"its memory limit was 256 MiB"):  # fmt: skip
        run_isolated(die, signal.SIGKILL, memory_limit=LIMIT)


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS])
def test_child_crash_is_invalid_input_not_500(sig: int) -> None:
    with pytest.raises(ValidatorCrashed) as ei:
        run_isolated(die, sig, memory_limit=LIMIT)
    assert ei.value.status == 422 and ei.value.type == "invalid-input"
    assert (
        ei.value.detail
        == f"the file crashed the validation process ({signal.Signals(sig).name}); its memory limit was 256 MiB"
    )


def test_child_exit_without_answer_is_invalid_input() -> None:
    with pytest.raises(ValidatorCrashed, match=r"ended without an answer \(exit code 3\); it had no memory limit"):
        run_isolated(os._exit, 3)


def test_limit_grows_with_the_file() -> None:
    settings = Settings(_env_file=None)
    assert settings.validation_memory_mb == 4096
    assert memory_limit(settings, 0) == 4096 * MiB
    assert memory_limit(settings, 1000 * MiB) == 4096 * MiB + 4000 * MiB


def test_normal_validation_fits_the_default_limit(tmp_path: Path) -> None:
    """A ResNet-18 (11.7M parameters, 45 MB of safetensors) validates in a child under the default limit, using a
    small part of it (measured: its peak RSS grows by 3-5× the file's size)."""
    kwargs = {"num_classes": 10}
    path = tmp_path / "resnet18.safetensors"
    save_file(build_model("resnet18", **kwargs).state_dict(), path)
    size = path.stat().st_size
    limit = memory_limit(Settings(_env_file=None), size)
    info, data_kib, rss_kib = run_isolated(validate_and_measure, path, kwargs, memory_limit=limit)
    assert info.num_parameters == sum(p.numel() for p in build_model("resnet18", **kwargs).parameters())
    assert rss_kib * 1024 < limit / 8, (rss_kib, data_kib, size)
