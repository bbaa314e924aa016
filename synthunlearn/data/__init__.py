"""Data pipeline: files -> records -> token ids with loss labels -> rank-aware batches.

See the module docstrings for the exact formats: ``sources`` (files), ``formatting`` (record
kinds and how they become text and labels), ``tokenize`` (truncation, statistics), ``packing``,
``sampler`` (distributed, resumable order) and ``collate`` (padding).
"""

from synthunlearn.data.sources import load_records, resolve_data_path

__all__ = ["load_records", "resolve_data_path"]
