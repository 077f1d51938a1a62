"""Text datasets, stored as uploaded and tokenized at job time with the model's own tokenizer.

Formats, told apart by content: ``jsonl`` (one JSON object per line with a ``text`` string and an optional integer
``label``, or pre-tokenized ``input_ids`` with an optional ``attention_mask``), ``txt`` (UTF-8, one example per
non-empty line) and ``text_parquet`` (a parquet file with a ``text`` column and an optional integer ``label``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from core.errors import InvalidInput, TooLarge
from core.io.data.dataset import DatasetInfo, field_error

__all__ = ["TEXT_FORMATS", "TextData", "read_text_dataset", "text_format", "text_info"]

TEXT_FORMATS = ("jsonl", "txt", "text_parquet")
MAX_EXAMPLES = 1_000_000
MAX_TEXT_BYTES = 1024**3
_SNIFF = 64 * 1024


@dataclass
class TextData:
    texts: list[str] | None
    labels: list[int] | None
    input_ids: list[list[int]] | None = None
    attention_mask: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.input_ids or [])


def _parquet_text(path: str | os.PathLike) -> bool:
    try:
        import pyarrow.parquet as pq

        return "text" in pq.read_schema(os.fspath(path)).names
    except Exception:  # noqa: BLE001 (not a readable parquet file: not a text dataset)
        return False


def text_format(path: str | os.PathLike) -> str | None:
    """``jsonl``, ``txt`` or ``text_parquet`` when the file holds text examples, else ``None``."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF)
    if head.startswith(b"PAR1"):
        return "text_parquet" if _parquet_text(path) else None
    if not head or b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # a multi-byte character cut by the sniff window is still text
            return None
        text = head[: e.start].decode("utf-8")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "jsonl"
    return "txt"


def _bad(msg: str, loc: list) -> InvalidInput:
    return InvalidInput(msg, errors=[field_error(loc, msg)])


def _int_list(value: object, loc: list) -> list[int]:
    if not isinstance(value, list) or not value or not all(type(v) is int and 0 <= v < 2**24 for v in value):
        raise _bad("must be a non-empty list of token ids in [0, 2**24)", loc)
    return value


def _read_jsonl(path: str | os.PathLike) -> TextData:
    texts: list[str] = []
    labels: list[int | None] = []
    ids: list[list[int]] = []
    masks: list[list[int]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise _bad(f"line {n} is not valid JSON ({e.__class__.__name__})", ["file", f"line {n}"]) from e
            if not isinstance(row, dict):
                raise _bad(f"line {n} is not a JSON object", ["file", f"line {n}"])
            if "input_ids" in row:
                ids.append(_int_list(row["input_ids"], ["file", f"line {n}", "input_ids"]))
                mask = row.get("attention_mask", [1] * len(ids[-1]))
                if _int_list(mask, ["file", f"line {n}", "attention_mask"]) and len(mask) != len(ids[-1]):
                    raise _bad(f"line {n}: attention_mask and input_ids differ in length", ["file", f"line {n}"])
                masks.append(mask)
            else:
                text = row.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise _bad(f"line {n} has no 'text' string (or 'input_ids')", ["file", f"line {n}", "text"])
                texts.append(text)
            label = row.get("label")
            if label is not None and (type(label) is not int or label < 0 or label >= 2**31 - 1):
                raise _bad(f"line {n}: label must be a non-negative integer", ["file", f"line {n}", "label"])
            labels.append(label)
            if len(labels) > MAX_EXAMPLES:
                raise TooLarge(f"the dataset holds more than {MAX_EXAMPLES:,} examples")
    if texts and ids:
        raise _bad("the lines mix 'text' and 'input_ids': use one or the other", ["file"])
    return TextData(
        texts=texts or None if ids else texts,
        labels=_labels(labels),
        input_ids=ids or None,
        attention_mask=masks or None,
    )


def _labels(labels: list[int | None]) -> list[int] | None:
    given = [x for x in labels if x is not None]
    if not given:
        return None
    if len(given) != len(labels):
        raise _bad(f"{len(labels) - len(given)} example(s) have no label while others have one", ["file", "label"])
    return given


def _read_txt(path: str | os.PathLike) -> TextData:
    with open(path, encoding="utf-8") as f:
        texts = [line.rstrip("\r\n") for line in f if line.strip()]
    if len(texts) > MAX_EXAMPLES:
        raise TooLarge(f"the dataset holds more than {MAX_EXAMPLES:,} examples")
    return TextData(texts=texts, labels=None)


def _read_parquet(path: str | os.PathLike) -> TextData:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(os.fspath(path))
        if pf.metadata.num_rows > MAX_EXAMPLES:
            raise TooLarge(f"the dataset holds more than {MAX_EXAMPLES:,} examples")
        names = pf.schema_arrow.names
        table = pf.read(columns=[c for c in ("text", "label") if c in names])
    except (OSError, ValueError) as e:
        raise InvalidInput(f"cannot read the parquet file: {e}") from e
    texts = table.column("text").to_pylist()
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise _bad("the 'text' column must hold non-empty strings", ["file", "text"])
    labels = table.column("label").to_pylist() if "label" in table.column_names else None
    if labels is not None and not all(type(v) is int and v >= 0 for v in labels):
        raise _bad("the 'label' column must hold non-negative integers", ["file", "label"])
    return TextData(texts=texts, labels=labels)


def read_text_dataset(path: str | os.PathLike, fmt: str) -> TextData:
    """The examples of a text dataset file (at most ``MAX_TEXT_BYTES``); malformed files are a 422 naming the line."""
    if os.path.getsize(path) > MAX_TEXT_BYTES:
        raise TooLarge(f"the text dataset is over {MAX_TEXT_BYTES:,} bytes")
    try:
        data = {"jsonl": _read_jsonl, "txt": _read_txt, "text_parquet": _read_parquet}[fmt](path)
    except UnicodeDecodeError as e:
        raise _bad(f"the text is not valid UTF-8 (byte {e.start})", ["file"]) from e
    if len(data) == 0:
        raise _bad("the dataset is empty: no examples", ["file"])
    return data


def text_info(path: str | os.PathLike, fmt: str) -> DatasetInfo:
    data = read_text_dataset(path, fmt)
    return DatasetInfo(
        format=fmt,
        num_examples=len(data),
        input_shape=(),
        num_classes=None if data.labels is None else max(data.labels) + 1,
        has_val=False,
    )
