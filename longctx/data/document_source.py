"""The interface every document source implements (`DocumentSource`) and the splits they serve.

The kinds (text files in `sources.py`, `array_records.py`, `tfds_source.py`) implement it here, apart from
`sources.open_source`, which picks a kind from a `data.source` spec: so the kinds never import the dispatcher.
"""

import abc
import operator

import numpy as np

SPLITS = ("train", "valid")


class DocumentSource(abc.ABC):
    """Random access to the documents of one split; `grain.MapDataset.source(source)` takes it as it is.

    `tokenized` False: items are `str` texts; True: items are int32 arrays `[BOS] + ids + [EOS]`.
    """

    tokenized: bool = False

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of documents in the split."""

    @abc.abstractmethod
    def __getitem__(self, index: int) -> str | np.ndarray:
        """Document `index` (0 <= index < len; negative indices count from the end); IndexError outside."""

    @abc.abstractmethod
    def key(self, index: int) -> str:
        """A stable id of document `index` for messages and tests, e.g. "dir/a.jsonl:17"."""

    def lengths(self) -> np.ndarray | None:
        """int64 [len]: token count of every document of a tokenized source (from its metadata); None for text."""
        return None

    @abc.abstractmethod
    def describe(self) -> str:
        """A one-line description: kind, spec, split, number of documents."""

    def __repr__(self) -> str:
        return self.describe()

    def _checked_index(self, index: int) -> int:
        """`index` as a non-negative int below `len(self)`; IndexError otherwise."""
        index, size = operator.index(index), len(self)
        if not -size <= index < size:
            raise IndexError(f"document {index} of {self.describe()}")
        return index % size
