"""Text in, token-id batches out: corpus reading, sentencepiece tokenization, token-budget batching,
the built-in number-words corpus and the Multi30k download.

The names below are imported from their modules on first use (PEP 562), not when the package is: every
import of a submodule runs this file first, and eager re-exports made `tformer download`, which needs
only the standard library, import torch and sentencepiece (about 2 s) before fetching a file.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {  # each re-exported name and the module that defines it
    **dict.fromkeys(
        (
            "Batch",
            "BatchStream",
            "OverlongPairsError",
            "batch_cost",
            "collate",
            "filter_overlong",
            "plan_batches",
            "plan_sorted",
            "shard",
            "sorted_batches",
        ),
        "batching",
    ),
    **dict.fromkeys(
        ("CorpusError", "CorpusReport", "ParallelCorpus", "read_lines", "read_parallel", "read_tsv"), "corpus"
    ),
    **dict.fromkeys(("DownloadError", "download_multi30k"), "download"),
    **dict.fromkeys(("NumberSplits", "make_number_splits", "write_number_corpus"), "numbers"),
    **dict.fromkeys(("Tokenizer", "TokenizerError", "normalize"), "tokenizer"),
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
