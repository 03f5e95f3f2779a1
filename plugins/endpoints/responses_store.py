"""Where ``/v1/responses`` keeps stored responses: in memory (the default) or in SQLite (``--responses-store
sqlite:PATH``, so stored responses and ``previous_response_id`` survive a restart).

Each entry is a response object and the input items that led to it (the whole conversation, previous
responses included), so that a later request can continue it. The store is bounded by
``--responses-store-max-entries`` and ``--responses-store-max-bytes``: the oldest entries go first.
Not a plugin itself.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

log = logging.getLogger("patchbay.responses")

#: a stored response: {"response": {...}, "input": [items]}
Entry = dict[str, Any]


def _size(entry: Entry) -> int:
    return len(json.dumps(entry, separators=(",", ":")).encode())


class MemoryStore:
    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, tuple[Entry, int]] = OrderedDict()
        self._bytes = 0

    def get(self, rid: str) -> Entry | None:
        hit = self._entries.get(rid)
        return None if hit is None else hit[0]

    def put(self, rid: str, entry: Entry) -> None:
        size = _size(entry)
        old = self._entries.get(rid)
        if old is not None:
            self._bytes -= old[1]
        self._entries[rid] = (entry, size)  # an update keeps the entry's place: the oldest go first
        self._bytes += size
        while self._entries and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped

    def delete(self, rid: str) -> bool:
        old = self._entries.pop(rid, None)
        if old is not None:
            self._bytes -= old[1]
        return old is not None

    def unfinished(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class SqliteStore:
    """The same, in one SQLite file (WAL), written through on every change."""

    def __init__(self, path: str, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(Path(path).expanduser()), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # no fsync per write (the writes run on the event loop): a restart or a crash of the server loses
        # nothing; a crash of the machine may lose the last writes
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "id TEXT UNIQUE NOT NULL, size INTEGER NOT NULL, status TEXT, body TEXT NOT NULL)")

    def get(self, rid: str) -> Entry | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM responses WHERE id = ?", (rid,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, rid: str, entry: Entry) -> None:
        body = json.dumps(entry, separators=(",", ":"))
        status = entry["response"].get("status")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute("UPDATE responses SET size = ?, status = ?, body = ? WHERE id = ?",
                                       (len(body.encode()), status, body, rid))
                if cur.rowcount == 0:
                    self._db.execute("INSERT INTO responses (id, size, status, body) VALUES (?, ?, ?, ?)",
                                     (rid, len(body.encode()), status, body))
                self._evict()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _evict(self) -> None:
        count, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM responses").fetchone()
        while count > self.max_entries or total > self.max_bytes:
            row = self._db.execute("SELECT seq, size FROM responses ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM responses WHERE seq = ?", (row[0],))
            count, total = count - 1, total - row[1]

    def delete(self, rid: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount > 0

    def unfinished(self) -> list[str]:
        """Responses stored as queued or running (by a server that stopped before they finished)."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM responses WHERE status IN ('queued', 'in_progress')").fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(spec: str, max_entries: int, max_bytes: int) -> MemoryStore | SqliteStore:
    """``--responses-store``: ``memory`` or ``sqlite:PATH``. Responses a previous server left unfinished are
    marked failed (nothing will finish them)."""
    if spec == "memory":
        return MemoryStore(max_entries, max_bytes)
    store = SqliteStore(spec[len("sqlite:"):], max_entries, max_bytes)
    for rid in store.unfinished():
        entry = store.get(rid)
        if entry is not None:
            entry["response"]["status"] = "failed"
            entry["response"]["error"] = {"code": "server_error",
                                          "message": "The server stopped before this response finished."}
            store.put(rid, entry)
            log.info("response %s was left unfinished by a previous server: marked failed", rid)
    return store
