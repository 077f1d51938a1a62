"""Format detection of model files: a safetensors file whose header length starts with byte 0x80 (pickle's PROTO
opcode) is safetensors, not a pickle. Found while measuring validation memory on ResNet-50 (issue #12), whose
header is 0x7080 bytes long: one file in 256 was refused as "pickle"."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.errors import UnsafeFormat
from core.io.model_files import detect_format, load_state_dict


def _safetensors_with_header_length(path: Path, low_byte: int) -> None:
    """A valid safetensors file whose 8-byte header length has ``low_byte`` as its first byte (padded header)."""
    save_file({"w": torch.ones(2)}, path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = raw[8 : 8 + n].rstrip(b" "), raw[8 + n :]
    target = (len(header) // 256 + 1) * 256 + low_byte
    path.write_bytes(struct.pack("<Q", target) + header.ljust(target) + data)


def test_header_length_starting_with_0x80_is_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _safetensors_with_header_length(path, 0x80)
    assert path.read_bytes()[0] == 0x80
    assert detect_format(path) == "safetensors"
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))


def test_pickles_are_still_refused(tmp_path: Path) -> None:
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps({"w": [1.0] * 100, "h": json.dumps({"a": 1})}, protocol=protocol))
        with pytest.raises(UnsafeFormat, match="pickle"):
            detect_format(path)
