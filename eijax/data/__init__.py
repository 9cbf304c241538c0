"""S-SFT data layer: records, segmented layout, synthetic tasks, grain pipeline.

Modules:
  records     parse JSONL/Parquet records, render them into ctx/query/answer tokens
  layout      sink + segment layout of one record, truncation, buckets (NumPy only)
  synthetic   passkey and multi-key needle tasks on real prose, and their scoring
  bucketing   grain IterDataset that batches examples of one bucket length
  pipeline    config -> checkpointable grain iterator of batches
  byte_tokenizer  tiny deterministic tokenizer for tests

The pipeline names are imported lazily (grain takes seconds to import).
"""

from eijax.data.layout import (LayoutConfig, LayoutError, bucket_for, fit_to_segments,
                               layout_record, segments_needed)
from eijax.data.records import (ChatRecord, LoadedRecords, QARecord, RecordError,
                                RecordParts, load_records, parse_record, render_parts)
from eijax.data.synthetic import (TASKS, SyntheticSource, make_sample, multikey_sample,
                                  passkey_sample, score_answer)

__all__ = [
    "LayoutConfig", "LayoutError", "bucket_for", "fit_to_segments", "layout_record",
    "segments_needed", "ChatRecord", "LoadedRecords", "QARecord", "RecordError", "RecordParts",
    "load_records", "parse_record", "render_parts", "TASKS", "SyntheticSource", "make_sample",
    "multikey_sample", "passkey_sample", "score_answer", "DataConfig", "build_dataset",
    "build_examples", "make_iterator", "example_from_record",
]

_LAZY = {"DataConfig", "build_dataset", "build_examples", "make_iterator",
         "example_from_record"}


def __getattr__(name):
    if name in _LAZY:
        from eijax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'eijax.data' has no attribute {name!r}")
