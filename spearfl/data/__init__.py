"""Tasks as `Example` records: packaged benchmarks and user JSONL files, splits, answer scoring."""

from spearfl.data.schema import Example
from spearfl.data.scoring import (
    ANSWER_MARKER,
    completion_has_answer,
    is_correct,
    parse_answer,
)
from spearfl.data.sources import (
    DATASETS,
    DatasetFormatError,
    DatasetUnavailable,
    DatasetSpec,
    load_examples,
    load_jsonl,
)
from spearfl.data.split import dirichlet_partition, split_pool_heldout

__all__ = [
    "ANSWER_MARKER",
    "DATASETS",
    "DatasetFormatError",
    "DatasetUnavailable",
    "DatasetSpec",
    "Example",
    "completion_has_answer",
    "dirichlet_partition",
    "is_correct",
    "load_examples",
    "load_jsonl",
    "parse_answer",
    "split_pool_heldout",
]
