"""Bucketed batching for grain: batches hold examples of one length only.

`BucketBatchIterDataset(parent, batch_size)` groups the parent's examples (dicts of
NumPy arrays, as made by `layout.layout_record` at bucket length) by the length of
their "tokens" and emits a batch [batch_size, length] as soon as one group is full.
Scalars (n_segments) become [batch_size] vectors.

At the end of a finite parent the partial groups are dropped (drop_remainder=True)
or emitted in ascending length, filled up with all-padding rows (tokens = pad_id,
valid False, labels 0, loss_mask 0, n_segments 0), so every batch has the same
batch dimension and no new shapes appear.

Checkpointing: the state is the parent's state plus, for every example waiting in a
group, the parent state *just before* that example was drawn. Restoring re-draws the
waiting examples from those states and then resumes the parent, so a restored
iterator continues exactly as the original would. States are plain JSON (what
grain's orbax CheckpointHandler writes); they stay small because groups hold fewer
than batch_size examples each.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

Example = dict[str, np.ndarray]


def _padding_row(example: Example, pad_id: int) -> Example:
    row = {k: np.zeros_like(v) for k, v in example.items()}
    row["tokens"] = np.full_like(example["tokens"], pad_id)
    return row


def stack_examples(examples: list[Example], batch_size: int, pad_id: int) -> Example:
    """Stacks examples into a batch, adding padding rows up to batch_size."""
    rows = examples + [_padding_row(examples[0], pad_id)] * (batch_size - len(examples))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class BucketBatchIterDataset(grain.IterDataset):
    """Batches examples of equal length; see the module docstring."""

    def __init__(self, parent: grain.IterDataset, *, batch_size: int,
                 drop_remainder: bool = True, pad_id: int = 0):
        super().__init__(parent)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._batch_size, self._drop_remainder, self._pad_id = batch_size, drop_remainder, pad_id

    def __iter__(self) -> "BucketBatchDatasetIterator":
        return BucketBatchDatasetIterator(self._parent.__iter__(), self._batch_size,
                                          self._drop_remainder, self._pad_id)

    def __str__(self) -> str:
        return f"BucketBatchIterDataset(batch_size={self._batch_size})"


class BucketBatchDatasetIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int,
                 drop_remainder: bool, pad_id: int):
        super().__init__(parent)
        self._batch_size, self._drop_remainder, self._pad_id = batch_size, drop_remainder, pad_id
        # length -> [(example, parent state before drawing it)], in arrival order
        self._groups: dict[int, list[tuple[Example, Any]]] = {}
        self._exhausted = False

    def _pop_group(self, length: int) -> Example:
        group = self._groups.pop(length)
        return stack_examples([ex for ex, _ in group], self._batch_size, self._pad_id)

    def __next__(self) -> Example:
        self._assert_not_closed()
        while not self._exhausted:
            before = self._parent.get_state()
            try:
                example = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            length = int(example["tokens"].shape[0])
            group = self._groups.setdefault(length, [])
            group.append((example, before))
            if len(group) == self._batch_size:
                return self._pop_group(length)
        if self._groups and not self._drop_remainder:
            return self._pop_group(min(self._groups))
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "waiting": [[length, [copy.deepcopy(s) for _, s in group]]
                        for length, group in sorted(self._groups.items())],
            "exhausted": self._exhausted,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._groups = {}
        for length, states in state["waiting"]:
            group = self._groups.setdefault(int(length), [])
            for s in states:
                self._parent.set_state(s)
                group.append((next(self._parent), s))
        self._parent.set_state(state["parent"])
        self._exhausted = bool(state["exhausted"])

    def __str__(self) -> str:
        return f"BucketBatchDatasetIterator(batch_size={self._batch_size})"
