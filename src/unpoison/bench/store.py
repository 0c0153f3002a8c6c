"""The results store: one SQLite file per OUTDIR (``OUTDIR/results.sqlite``).

It records the schema version, the grid's fingerprint and config, and one row per cell: key, config
JSON, status (``pending`` / ``running`` / ``done`` / ``failed``), manifest JSON, accuracies, PSNR,
timings, error text and the content digest of the data the cell ran on. A finished cell counts as
finished only for that data: when the dataset behind a spec changes, its cells run again. Only the
driver process writes (workers return their records), so SQLite's single-writer rule is never strained.
Opening a store checks version and fingerprint *before* writing anything: a mismatch is a
:class:`UserError` and the file is left as it was.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..utils import to_json
from .grid import Cell

SCHEMA_VERSION = 2
DB_NAME = "results.sqlite"
STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    idx INTEGER NOT NULL,
    cell_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    final_acc REAL,
    best_acc REAL,
    psnr REAL,
    results TEXT,
    manifest TEXT,
    timings TEXT,
    error TEXT,
    started REAL,
    finished REAL,
    data_digest TEXT
);
"""


class Store:
    """A grid's results. Use :meth:`create_or_open` to run a grid and :meth:`open_existing` to read one."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn

    # --- opening -----------------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        return conn

    @classmethod
    def _check(cls, path: Path) -> sqlite3.Connection:
        """Open an existing store read-write after checking it is one of ours, of this version."""
        try:
            conn = cls._connect(path)
            rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise UserError(f"not an unpoison results store ({e})", path) from None
        version = rows.get("schema_version")
        if version == "1":  # v1 had no data digests: add the column; its finished cells count as stale
            with conn:
                conn.execute("ALTER TABLE cells ADD COLUMN data_digest TEXT")
                conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            version = str(SCHEMA_VERSION)
        if version != str(SCHEMA_VERSION):
            conn.close()
            raise UserError(f"results store has schema version {version}, this unpoison writes version "
                            f"{SCHEMA_VERSION}; use a fresh OUTDIR", path)
        return conn

    @classmethod
    def open_existing(cls, outdir: str | Path) -> Store:
        path = Path(outdir) / DB_NAME
        if not path.exists():
            raise UserError(f"no results store ({DB_NAME}) here; run 'unpoison bench' first", outdir)
        return cls(path, cls._check(path))

    @classmethod
    def create_or_open(cls, outdir: str | Path, fp: str, cells: list[Cell], config: dict[str, Any],
                       extend: bool = False) -> Store:
        """Create the store for this grid, or reopen it when OUTDIR already holds the same grid (``extend``:
        or an earlier version of it, see :meth:`_extend`)."""
        outdir = Path(outdir)
        path = outdir / DB_NAME
        if path.exists():
            conn = cls._check(path)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("fingerprint") != fp:
                if extend:
                    try:
                        cls._extend(conn, path, meta, fp, cells, config)
                    except BaseException:
                        conn.close()
                        raise
                    return cls(path, conn)
                conn.close()
                raise UserError(f"OUTDIR holds another grid's results ({meta.get('name')!r}, preset "
                                f"{meta.get('preset')!r}, fingerprint {meta.get('fingerprint')}; this grid is {fp}); "
                                "use another OUTDIR, or --extend to add this grid's new cells to it", path)
            return cls(path, conn)
        outdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{DB_NAME}.tmp")
        tmp.unlink(missing_ok=True)
        conn = cls._connect(tmp)
        conn.executescript(_SCHEMA)
        meta = {"schema_version": str(SCHEMA_VERSION), "fingerprint": fp, "name": str(config.get("name")),
                "preset": str(config.get("_preset")), "config": to_json(config), "created": str(time.time()),
                "title": str(config.get("title") or config.get("name"))}
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        conn.executemany("INSERT INTO cells (key, idx, cell_id, kind, config) VALUES (?, ?, ?, ?, ?)",
                         [(c.key, c.index, c.id, c.config["kind"], json.dumps(c.config)) for c in cells])
        conn.execute("COMMIT")
        conn.close()
        tmp.replace(path)  # a store appears whole or not at all
        return cls(path, cls._connect(path))

    @staticmethod
    def _extend(conn: sqlite3.Connection, path: Path, meta: dict[str, str], fp: str, cells: list[Cell],
                config: dict[str, Any]) -> None:
        """Grow a grid in place: the same name and preset; every cell it already holds keeps its status and
        results when its config is unchanged; new cells are added pending; cells the config no longer names
        stay when they finished (reported after the others; nothing measured is lost) and go when they did not.
        A cell whose label is held with another config is an error (its results would be mistaken for the new
        config's): nothing is written then."""
        if meta.get("name") != str(config.get("name")) or meta.get("preset") != str(config.get("_preset")):
            raise UserError(f"--extend: OUTDIR holds grid {meta.get('name')!r} (preset {meta.get('preset')!r}), "
                            f"not {config.get('name')!r} (preset {config.get('_preset')!r}); use another OUTDIR", path)
        rows = list(conn.execute("SELECT key, config, status FROM cells"))
        held = {r["key"]: json.loads(r["config"]) for r in rows}
        done = {r["key"] for r in rows if r["status"] == "done"}
        for c in cells:
            if c.key in held and held[c.key] != json.loads(json.dumps(c.config)):
                raise UserError(f"--extend: cell {c.key!r} is held with another config; give the changed entry a "
                                "new label (nothing was written)", path)
        wanted = {c.key for c in cells}
        others = [k for k in held if k not in wanted and k in done]
        conn.execute("BEGIN")
        for k in held:
            if k not in wanted and k not in done:
                conn.execute("DELETE FROM cells WHERE key=?", (k,))
        for c in cells:
            if c.key in held:
                conn.execute("UPDATE cells SET idx=? WHERE key=?", (c.index, c.key))
            else:
                conn.execute("INSERT INTO cells (key, idx, cell_id, kind, config) VALUES (?, ?, ?, ?, ?)",
                             (c.key, c.index, c.id, c.config["kind"], json.dumps(c.config)))
        for i, k in enumerate(others):
            conn.execute("UPDATE cells SET idx=? WHERE key=?", (len(cells) + i, k))
        for k, v in (("fingerprint", fp), ("config", to_json(config)),
                     ("title", str(config.get("title") or config.get("name")))):
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, v))
        conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    # --- reading -----------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    def config(self) -> dict[str, Any]:
        return json.loads(self.meta()["config"])

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for r in self.conn.execute("SELECT * FROM cells ORDER BY idx"):
            d = dict(r)
            for k in ("config", "results", "manifest", "timings"):
                d[k] = json.loads(d[k]) if d[k] else None
            out.append(d)
        return out

    def status_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        counts.update(dict(self.conn.execute("SELECT status, COUNT(*) FROM cells GROUP BY status").fetchall()))
        return counts

    def todo(self, cells: list[Cell], retry_failed: bool = True) -> tuple[list[Cell], list[Cell]]:
        """``(to run, stale)``: cells pending, running (a killed run's; they resume), failed (if asked), and
        finished ones whose data digest differs from the cell's current ``data`` (``stale``, also run)."""
        wanted = {"pending", "running"} | ({"failed"} if retry_failed else set())
        rows = {r["key"]: r for r in self.conn.execute("SELECT key, status, data_digest FROM cells")}
        run, stale = [], []
        for c in sorted(cells, key=lambda c: c.index):
            r = rows[c.key]
            if r["status"] in wanted:
                run.append(c)
            elif r["status"] == "done" and (r["data_digest"] or "") != c.data:
                run.append(c)
                stale.append(c)
        return run, stale

    def status_of(self, keys: list[str]) -> dict[str, str]:
        q = f"SELECT key, status FROM cells WHERE key IN ({','.join('?' * len(keys))})"
        return dict(self.conn.execute(q, keys).fetchall()) if keys else {}

    # --- writing -----------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def mark_running(self, key: str) -> None:
        with self._tx():
            self.conn.execute("UPDATE cells SET status='running', attempts=attempts+1, started=?, error=NULL "
                              "WHERE key=?", (time.time(), key))

    def record(self, key: str, rec: dict[str, Any]) -> None:
        """Store a worker's record: ``{status, results, manifest, timings, error}``."""
        res = rec.get("results") or {}
        with self._tx():
            self.conn.execute(
                "UPDATE cells SET status=?, final_acc=?, best_acc=?, psnr=?, results=?, manifest=?, timings=?, "
                "error=?, finished=?, data_digest=? WHERE key=?",
                (rec["status"], _num(res.get("final_acc")), _num(res.get("best_acc")), _num(res.get("psnr")),
                 to_json(res), to_json(rec.get("manifest") or {}), to_json(rec.get("timings") or {}),
                 rec.get("error"), time.time(), rec.get("data_digest"), key))


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None
