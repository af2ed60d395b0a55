"""Fixed-width text tables for the benchmarks' reports: each column's title, width and format in one
place, so that a header and its rows cannot drift apart.

    COLUMNS = (Column("config", "<11", "config"), Column("ms/iter", ">9.1f", "ms_per_iter"))
    print(header(COLUMNS))
    for r in rows:
        print(line(r, COLUMNS, keys=1))  # a row with an "error" shows its config and the error
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


class Column(NamedTuple):
    title: str
    spec: str  # the cell's format spec, e.g. ">9.1f"; the title is aligned the same way, as wide
    value: str | Callable[[dict], Any]  # the row's key, or a function of the row

    def head(self) -> str:
        align, width = re.match(r"([<>^]?)(\d*)", self.spec).groups()
        return f"{self.title:{align or '<'}{width}}"

    def cell(self, row: dict) -> str:
        return format(row[self.value] if isinstance(self.value, str) else self.value(row), self.spec)


def header(columns: Sequence[Column]) -> str:
    return " ".join(c.head() for c in columns)


def line(row: dict, columns: Sequence[Column], keys: int = 0) -> str:
    """``row``'s cells; a row holding an "error" shows its first ``keys`` cells and the error."""
    if "error" in row:
        return " ".join(c.cell(row) for c in columns[:keys]) + f" n/a: {row['error']}"
    return " ".join(c.cell(row) for c in columns)


def percent(key: str, inner: str | None = None) -> Callable[[dict], str]:
    """A cell ``row[key]`` (or ``row[key][inner]``), a fraction, as "12.3%"."""
    return lambda r: f"{100 * (r[key] if inner is None else r[key][inner]):.1f}%"
