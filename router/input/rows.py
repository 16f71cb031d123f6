"""Checked rows for a model with named columns, before they become the model's input.

A request's rows are kept as one typed array per signature column (in signature order), not as a
``pandas.DataFrame``: building a frame costs far more than checking a one-row request, and under
concurrency requests share one model call anyway. The batcher joins the requests' :class:`Rows`
and builds ONE model input per call: :meth:`Rows.frame` (what MLflow's scoring server hands the
model: a frame of these arrays) or :meth:`Rows.matrix` (a 2-D array, for a model proven at load to
answer it exactly as it answers the frame: ``router.scoring.flavors``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True, eq=False)
class Rows:
    names: tuple[str, ...]  # the signature's columns present in the input, in signature order
    arrays: tuple[Any, ...]  # one per name: a numpy array, or a pandas ExtensionArray
    n_rows: int
    index: list[Any] | None = None  # the labels a client sent (dataframe_split), else 0..n-1
    # One (columns x rows) array whose rows are ``arrays``, when one was built for them all (an
    # all-double input): requests then join in one call and the matrix is a view of it.
    block: np.ndarray | None = None

    @cached_property
    def key(self) -> Hashable:
        """Rows with equal keys join without changing any column's dtype."""
        return self.names, tuple(array.dtype for array in self.arrays)

    def frame(self) -> pd.DataFrame:
        """The rows as MLflow's scoring server would hand them to the model."""
        index = pd.RangeIndex(self.n_rows) if self.index is None else pd.Index(self.index)
        return pd.DataFrame(
            dict(zip(self.names, self.arrays, strict=True)), index=index, copy=False
        )

    def matrix(self) -> np.ndarray:
        """The rows as one 2-D array: what ``self.frame().to_numpy()`` gives for numeric columns,
        in its memory order too (column-major: BLAS sums in another order for a row-major array,
        which changes the last bit of a linear model's answer)."""
        if self.block is not None:
            return self.block.T
        return np.array(self.arrays).T

    def float_columns(self) -> list[tuple[str, np.ndarray]]:
        return [
            (name, array)
            for name, array in zip(self.names, self.arrays, strict=True)
            if isinstance(array, np.ndarray) and array.dtype.kind == "f"
        ]

    @staticmethod
    def join(parts: Sequence[Rows]) -> Rows:
        """The parts' rows in order (parts of one key); labels kept as ``pd.concat`` keeps them."""
        if len(parts) == 1:
            return parts[0]
        head = parts[0]
        n_rows = sum(part.n_rows for part in parts)
        index = _joined_index(parts)
        blocks = [part.block for part in parts if part.block is not None]
        if len(blocks) == len(parts):
            block = np.concatenate(blocks, axis=1)  # one call, not one per column
            return Rows(head.names, tuple(block), n_rows, index, block=block)
        arrays = tuple(_concat([part.arrays[i] for part in parts]) for i in range(len(head.names)))
        return Rows(head.names, arrays, n_rows, index)


def _joined_index(parts: Sequence[Rows]) -> list[Any] | None:
    """The labels ``pd.concat`` would keep: a part without any counts 0..n-1 of its own."""
    if all(part.index is None for part in parts):
        return None
    index: list[Any] = []
    for part in parts:
        index.extend(range(part.n_rows) if part.index is None else part.index)
    return index


def _concat(arrays: list[Any]) -> Any:
    if all(isinstance(array, np.ndarray) for array in arrays):
        return np.concatenate(arrays)
    return pd.concat([pd.Series(array, copy=False) for array in arrays], ignore_index=True).array
