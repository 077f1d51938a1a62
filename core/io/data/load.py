"""Loading a dataset file from where it is: a path the server chose, or a user-named path or URI."""

from __future__ import annotations

import os

from core.errors import InvalidInput, TooLarge
from core.io.data.dataset import Dataset, DatasetInfo
from core.io.data.formats import DatasetFormat, read_dataset_file
from core.io.data.text import TEXT_FORMATS, text_format, text_info
from core.io.uris import local_path

DEFAULT_MAX_BYTES = 2 * 1024**3  # a dataset file (compressed, as stored)


def _load(
    path_or_uri: str | os.PathLike, fmt: str | None, allowed_roots: list[str] | None, max_bytes: int
) -> tuple[Dataset, DatasetFormat]:
    target = os.fspath(path_or_uri)
    if allowed_roots is not None:
        with local_path(target, allowed_roots, max_bytes) as local:
            return _read(local, target, fmt, max_bytes)
    # A trusted, server-side path (e.g. an upload already stored by the API): no URIs here.
    if "://" in target:
        raise InvalidInput("a data URI needs allowed roots to be checked against")
    return _read(target, target, fmt, max_bytes)


def _read(local: str, target: str, fmt: str | None, max_bytes: int) -> tuple[Dataset, DatasetFormat]:
    """The dataset in the local file ``local`` (``target`` names it in errors), once it is known to be a regular
    file of at most ``max_bytes``."""
    if fmt in TEXT_FORMATS:
        raise InvalidInput(
            f"a {fmt} text dataset needs a Hugging Face model (it is tokenized with the model's tokenizer)"
        )
    try:
        size = os.path.getsize(local)
    except FileNotFoundError as e:
        raise InvalidInput(f"dataset file not found: {target}") from e
    if not os.path.isfile(local):
        raise InvalidInput(f"not a regular file: {target}")
    if size > max_bytes:
        raise TooLarge(f"the dataset file is {size} bytes, over the limit of {max_bytes} bytes")
    return read_dataset_file(local, fmt)


def load_dataset(
    path_or_uri: str | os.PathLike,
    fmt: DatasetFormat | None = None,
    *,
    allowed_roots: list[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Dataset:
    """Load a dataset file (format detected from content; ``fmt``, if given, must agree).

    With ``allowed_roots`` the location is a user-named path/URI checked by :func:`core.io.uris.resolve_uri`
    (remote files are fetched to a temporary directory under the ``max_bytes`` cap); without, it must be
    a plain local path the server itself chose.
    """
    return _load(path_or_uri, fmt, allowed_roots, max_bytes)[0]


def validate_dataset_file(path: str | os.PathLike, fmt: DatasetFormat | None = None) -> DatasetInfo:
    """Load the file with every check a run applies, and summarise it (text datasets: see core.io.data.text)."""
    text = fmt if fmt in TEXT_FORMATS else (text_format(path) if fmt is None and os.path.isfile(path) else None)
    if text is not None:
        return text_info(path, text)
    data, detected = _load(path, fmt, None, DEFAULT_MAX_BYTES)
    return DatasetInfo(
        format=detected,
        num_examples=len(data),
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        has_val=data.has_val,
    )
