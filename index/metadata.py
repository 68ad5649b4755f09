"""Item metadata in SQLite (`items.sqlite`): row = faiss id, queryable by id and filterable by category.

Removal only sets `removed`: rows keep their number, so faiss ids never shift. A removed id may be added
again later (restocked): it gets a new row, and the unique index covers live rows only.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.catalogue import Item

SCHEMA = """
CREATE TABLE items (
    row INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    category TEXT NOT NULL,
    subcategory TEXT NOT NULL,
    image TEXT NOT NULL,
    product_group TEXT NOT NULL,
    source TEXT NOT NULL,
    metadata TEXT NOT NULL,
    removed INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX items_live_id ON items(id) WHERE removed = 0;
CREATE INDEX items_category ON items(category);
CREATE INDEX items_subcategory ON items(subcategory);
"""

COLUMNS = (
    "row",
    "id",
    "title",
    "text",
    "category",
    "subcategory",
    "image",
    "product_group",
    "source",
    "metadata",
    "removed",
)
# Filter keys the service may use, mapped to SQL; `metadata.<field>` reads a field of the JSON column.
FILTER_COLUMNS = {"id": "id", "category": "category", "subcategory": "subcategory", "group": "product_group"}


def create_items_db(path: str | Path) -> sqlite3.Connection:
    """A new, empty items database for a build."""
    connection = sqlite3.connect(path)
    connection.executescript(SCHEMA)
    return connection


def insert_items(connection: sqlite3.Connection, first_row: int, items: Sequence[Item], source: str) -> None:
    """Store items as rows first_row, first_row + 1, ... (the faiss ids their vectors get)."""
    connection.executemany(
        "INSERT INTO items (row, id, title, text, category, subcategory, image, product_group, source, metadata)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                first_row + offset,
                item.id,
                item.title,
                item.text,
                item.category,
                item.subcategory,
                item.image,
                item.group,
                source,
                json.dumps(dict(item.metadata), ensure_ascii=False, sort_keys=True),
            )
            for offset, item in enumerate(items)
        ],
    )


def live_ids(connection: sqlite3.Connection) -> set[str]:
    return {item_id for (item_id,) in connection.execute("SELECT id FROM items WHERE removed = 0")}


def mark_removed(connection: sqlite3.Connection, item_ids: Iterable[str]) -> tuple[list[str], list[str]]:
    """Flag the live rows of these ids removed: (ids removed now, ids with no live row)."""
    removed, unknown = [], []
    for item_id in dict.fromkeys(str(i) for i in item_ids):  # dedupe, keep order
        cursor = connection.execute("UPDATE items SET removed = 1 WHERE id = ? AND removed = 0", (item_id,))
        (removed if cursor.rowcount else unknown).append(item_id)
    return removed, unknown


def open_items_db(path: str | Path) -> sqlite3.Connection:
    """Read-only, shareable across threads (callers hold a lock); `immutable` as bundles never change in place."""
    uri = f"{Path(path).resolve().as_uri()}?mode=ro&immutable=1"
    connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
    connection.row_factory = sqlite3.Row
    return connection


def row_to_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "row": row["row"],
        "id": row["id"],
        "title": row["title"],
        "text": row["text"],
        "category": row["category"],
        "subcategory": row["subcategory"],
        "image": row["image"],
        "group": row["product_group"],
        "source": row["source"],
        "metadata": json.loads(row["metadata"]),
        "removed": bool(row["removed"]),
    }


def fetch_rows(connection: sqlite3.Connection, rows: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Metadata of these rows keyed by row (SQLite caps bound parameters, so in chunks)."""
    found: dict[int, dict[str, Any]] = {}
    unique = sorted({int(r) for r in rows})
    for start in range(0, len(unique), 500):
        chunk = unique[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for row in connection.execute(f"SELECT * FROM items WHERE row IN ({marks})", chunk):
            found[row["row"]] = row_to_dict(row)
    return found


def fetch_live_by_id(connection: sqlite3.Connection, item_id: str) -> dict[str, Any] | None:
    row = connection.execute("SELECT * FROM items WHERE id = ? AND removed = 0", (item_id,)).fetchone()
    return None if row is None else row_to_dict(row)


def removed_rows(connection: sqlite3.Connection) -> np.ndarray:
    return np.array(
        [r for (r,) in connection.execute("SELECT row FROM items WHERE removed = 1")], dtype=np.int64
    )


def count_rows(connection: sqlite3.Connection) -> int:
    return connection.execute("SELECT COUNT(*) FROM items").fetchone()[0]


def rows_matching(connection: sqlite3.Connection, filters: Mapping[str, str | Sequence[str]]) -> np.ndarray:
    """Sorted live rows whose fields equal the filters (a list value means any of them), all filters ANDed."""
    clauses, values = ["removed = 0"], []
    for key, wanted in filters.items():
        if key in FILTER_COLUMNS:
            column = FILTER_COLUMNS[key]
        elif key.startswith("metadata.") and key[len("metadata.") :].replace("_", "").isalnum():
            column = f"json_extract(metadata, '$.{key[len('metadata.') :]}')"
        else:
            raise ValueError(
                f"cannot filter on {key!r}: use one of {sorted(FILTER_COLUMNS)} or metadata.<field>"
            )
        options = [wanted] if isinstance(wanted, str) else list(wanted)
        clauses.append(f"{column} IN ({','.join('?' * len(options))})")
        values.extend(options)
    sql = f"SELECT row FROM items WHERE {' AND '.join(clauses)} ORDER BY row"
    return np.array([r for (r,) in connection.execute(sql, values)], dtype=np.int64)
