"""Data pipeline: files -> records -> token ids with loss labels -> rank-aware batches.

See the module docstrings for the exact formats: ``sources`` (files), ``formatting`` (record
kinds and how they become text and labels), ``tokenize`` (labels, truncation, statistics),
``packing``, ``sampler`` (distributed, resumable order) and ``collate`` (padding).
"""

from synthunlearn.data.collate import collate
from synthunlearn.data.dataset import TokenizedDataset, build_dataset
from synthunlearn.data.formatting import QA_ANSWER, QA_PROMPT, Formatted, Formatter, detect_kind
from synthunlearn.data.packing import pack_examples
from synthunlearn.data.sampler import StatefulSampler
from synthunlearn.data.sources import load_records, resolve_data_path
from synthunlearn.data.tokenize import IGNORE_INDEX, check_vocab, tokenize_formatted

__all__ = [
    "IGNORE_INDEX", "QA_ANSWER", "QA_PROMPT", "Formatted", "Formatter", "StatefulSampler",
    "TokenizedDataset", "build_dataset", "check_vocab", "collate", "detect_kind", "load_records",
    "pack_examples", "resolve_data_path", "tokenize_formatted",
]
