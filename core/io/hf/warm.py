"""transformers' import, paid once by the validation fork server instead of by every Hugging Face upload.

Checking an upload builds the model ``from_config`` (:mod:`core.io.hf.build`), which imports ``transformers`` and its
``modeling_utils`` (~1,500 modules, 10-15 s on a busy 2-core machine) and then the architecture's own module. The
fork server imports this module (``api.isolation.PRELOAD``), so each validation process it forks starts with them
loaded (copy-on-write) and pays only its own model's work. The common architectures' modules come too (a few
hundred ms each to import); any other model type imports its own module on first use, as before.
"""

from __future__ import annotations

import importlib

import tokenizers  # noqa: F401 (preloaded: core.io.hf.tokenizer)
import transformers
import transformers.modeling_utils  # noqa: F401 (preloaded: the import every from_config pays)
from transformers import AutoConfig, AutoModel  # noqa: F401 (preloaded: core.io.hf.build)

#: model types whose modelling module is imported ahead (encoders, sentence embedders and small causal LMs)
COMMON = ("bert", "roberta", "distilbert", "mpnet", "xlm_roberta", "gpt2", "llama", "qwen2", "mistral", "opt")

for _name in COMMON:
    try:
        importlib.import_module(f"transformers.models.{_name}.modeling_{_name}")
    except ImportError:  # a transformers release without it: that model type imports on use
        pass
