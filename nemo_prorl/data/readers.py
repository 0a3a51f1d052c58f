"""Random access to the rows of local data files without loading them: JSONL through an index of line
offsets (8 bytes a row), Parquet through its row groups (one decoded group held at a time). Errors name
the file and the row (JSONL: the line number).

`EpochOrder` gives the deterministic shuffled order of an epoch as a two-level permutation: fixed-size
chunks of rows in a seeded order, rows in a seeded order inside each chunk. It streams (one chunk's
permutation in memory), can start at any position (exact resume), and does not depend on the file's
physical layout. Rows appended to a file after an epoch began form a new segment of that epoch, so a
resumed run neither repeats nor skips a row.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
from abc import ABC, abstractmethod
from typing import Any, Iterator, Sequence

import numpy as np

CHUNK_ROWS = 4096


class DataError(ValueError):
    """Bad input data; the message names the file and, where there is one, the row."""


class RowReader(ABC):
    path: str

    @property
    @abstractmethod
    def num_rows(self) -> int: ...

    @abstractmethod
    def read(self, i: int) -> dict[str, Any]:
        """Row i as a dict; DataError naming the file and row if it cannot be read."""

    def where(self, i: int) -> str:
        return f"{self.path}: row {i}"

    def refresh(self) -> None:
        """See rows appended since the file was opened."""


class JsonlReader(RowReader):
    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        self._offsets = np.zeros(0, dtype=np.int64)
        self._size = 0  # bytes indexed
        self._complete = 0  # offset just past the last newline indexed
        self._partial = False
        self._lock = threading.Lock()
        self._fh = open(path, "rb")
        self.refresh()

    def refresh(self) -> None:
        """Index line starts from the end of the last complete line seen (a file in use only grows)."""
        size = os.path.getsize(self.path)
        if size < self._size:
            raise DataError(f"{self.path}: the file shrank from {self._size} to {size} bytes while in use")
        if size == self._size:
            return
        if self._partial:  # the last line had no newline yet: it is indexed again below
            self._offsets = self._offsets[:-1]
        parts, pos = [], self._complete
        line_start = pos
        with open(self.path, "rb") as f:
            f.seek(pos)
            for chunk in iter(lambda: f.read(1 << 22), b""):
                ends = pos + np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)  # "\n" positions
                if len(ends):
                    parts.append(np.concatenate([[line_start], ends[:-1] + 1]).astype(np.int64))
                    line_start = int(ends[-1]) + 1
                pos += len(chunk)
        self._complete, self._partial = line_start, line_start < pos
        if self._partial:
            parts.append(np.array([line_start], dtype=np.int64))  # a last line without a newline is a row too
        self._offsets = np.concatenate([self._offsets, *parts])
        self._size = pos

    @property
    def num_rows(self) -> int:
        return len(self._offsets)

    def where(self, i: int) -> str:
        return f"{self.path}: line {i + 1}"

    def read(self, i: int) -> dict[str, Any]:
        with self._lock:
            self._fh.seek(int(self._offsets[i]))
            raw = self._fh.readline()
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            raise DataError(f"{self.where(i)}: empty line")
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.where(i)}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{self.where(i)}: expected a JSON object, got {type(row).__name__}")
        return row


class ParquetReader(RowReader):
    def __init__(self, path: str) -> None:
        import pyarrow.parquet as pq

        self.path = path
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        try:
            self._pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001  pyarrow raises several types for a corrupt file
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        md = self._pf.metadata
        self._starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
        self._cached: tuple[int, list[dict]] = (-1, [])
        self._lock = threading.Lock()

    @property
    def num_rows(self) -> int:
        return int(self._starts[-1])

    def read(self, i: int) -> dict[str, Any]:
        g = bisect.bisect_right(self._starts, i) - 1
        with self._lock:
            if self._cached[0] != g:
                try:
                    self._cached = (g, self._pf.read_row_group(g).to_pylist())
                except Exception as e:  # noqa: BLE001
                    raise DataError(f"{self.path}: row group {g} (rows {self._starts[g]}-{self._starts[g + 1] - 1}) "
                                    f"cannot be read ({type(e).__name__}: {e})") from None
            return self._cached[1][i - int(self._starts[g])]


READERS = {".jsonl": JsonlReader, ".json": JsonlReader, ".parquet": ParquetReader}


def open_reader(path: str) -> RowReader:
    ext = os.path.splitext(path)[1].lower()
    if ext not in READERS:
        raise DataError(f"{path}: unsupported file type {ext!r}; use one of {', '.join(sorted(READERS))}")
    return READERS[ext](os.path.expanduser(path))


class EpochOrder:
    """The rows of one epoch, in order: segments (row ranges) one after another, each shuffled in two
    levels. Position p is the p-th row served in the epoch."""

    def __init__(self, seed: int | Sequence[int], epoch: int, segments: Sequence[tuple[int, int]],
                 chunk_rows: int = CHUNK_ROWS) -> None:
        self.seed = [seed] if isinstance(seed, int) else list(seed)
        self.epoch, self.chunk_rows = epoch, chunk_rows
        self.segments = [(int(a), int(b)) for a, b in segments]
        self.length = sum(b - a for a, b in self.segments)

    def _chunks(self, s: int) -> list[tuple[int, int]]:
        a, b = self.segments[s]
        bounds = [(c, min(c + self.chunk_rows, b)) for c in range(a, b, self.chunk_rows)]
        rng = np.random.default_rng([*self.seed, self.epoch, s])
        return [bounds[k] for k in rng.permutation(len(bounds))]

    def iter_from(self, pos: int) -> Iterator[int]:
        """Row indices from position `pos` to the end of the epoch."""
        skip = pos
        for s in range(len(self.segments)):
            for ci, (a, b) in enumerate(self._chunks(s)):
                n = b - a
                if skip >= n:
                    skip -= n
                    continue
                rng = np.random.default_rng([*self.seed, self.epoch, s, ci])
                perm = rng.permutation(n)
                for k in perm[skip:]:
                    yield a + int(k)
                skip = 0
