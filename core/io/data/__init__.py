"""Datasets: safe loaders for .npz, .safetensors and .parquet, built-in datasets, and a model/data check.

``dataset`` holds the in-memory :class:`Dataset` and its split; ``formats`` reads each file format (nothing
unpickles); ``load`` finds the file (a server path, or a user-named path/URI under allowed roots); ``builtin`` the
bundled datasets; ``compat`` whether a model runs on the data.
"""

from core.io.data.builtin import BUILTIN_DATASETS, builtin_dataset
from core.io.data.compat import check_compatible, check_compatible_shapes
from core.io.data.dataset import Dataset, DatasetInfo, holdout_size, max_train_examples
from core.io.data.formats import MAX_UNCOMPRESSED_BYTES, DatasetFormat, detect_dataset_format
from core.io.data.load import DEFAULT_MAX_BYTES, load_dataset, validate_dataset_file

__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_MAX_BYTES",
    "MAX_UNCOMPRESSED_BYTES",
    "Dataset",
    "DatasetFormat",
    "DatasetInfo",
    "builtin_dataset",
    "check_compatible",
    "check_compatible_shapes",
    "detect_dataset_format",
    "holdout_size",
    "load_dataset",
    "max_train_examples",
    "validate_dataset_file",
]
