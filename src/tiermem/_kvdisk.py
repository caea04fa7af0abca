"""The disk tier of kept KV states: one file a state, the index in SQLite.

A directory holds `<id>.kvs` files and `index.sqlite3`, whose one table is

    states(namespace, session, file, tokens, bytes, fingerprint, last_used)
    dropped(namespace, session, at)

keyed on (namespace, session): the session's latest spilled state, and when the session's
states were last dropped (deleted): a state made before that, still in another process's
RAM, is never written afterwards. A dropped state's file is overwritten before it is
removed. A file is written to a
temporary name, fsynced and renamed before its row is committed, so a crash leaves at worst
an orphan file (removed at the next open once it is a minute old), never a row naming a
partial file. The tier keeps under its own byte budget by dropping the least recently used
states. Several processes may share a directory (SQLite serialises the index; a state read
while another process replaces it is simply not found).

A file is `MAGIC`, a JSON header (the key, fingerprint, crc and token count) and then the
token ids (int32) and the llama.cpp sequence state. Nothing read from a file is trusted:
a bad header or a short file is a miss (the file is removed), and the state's crc and
fingerprint are checked again before it is loaded (`_kvstate.restore`).

Everything here is blocking: it runs in the model's worker thread or the spill writer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import struct
import threading
import time
import uuid
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import StorageError

log = logging.getLogger("tiermem")

if TYPE_CHECKING:
    from ._kvstate import KVState, StateKey


def _read(path: Path) -> bytearray:
    """The whole file in one buffer, read once (a state is tens of MB)."""
    with path.open("rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        raw = bytearray(size)
        view, done = memoryview(raw), 0
        while done < size and (n := f.readinto(view[done:])):
            done += n
    return raw if done == size else raw[:done]


class _ForeignFile(ValueError):
    """A state file that names another session."""


def _parse(raw: bytearray, key: StateKey) -> KVState:
    """A state file's contents as the session's state; ValueError (and the like) when it
    is not one."""
    from ._kvstate import KVState

    head_end = len(MAGIC) + _HEAD.size
    if raw[: len(MAGIC)] != MAGIC:
        raise ValueError("not a state file")
    (length,) = _HEAD.unpack_from(raw, len(MAGIC))
    head = json.loads(raw[head_end : head_end + length])
    if [head["namespace"], head["session"]] != list(key):
        raise _ForeignFile("another session's file")
    body = head_end + length
    n = int(head["tokens"])
    tokens = array("i")
    tokens.frombytes(raw[body : body + 4 * n])
    if len(tokens) != n:
        raise ValueError("short file")
    return KVState(
        tuple(tokens),
        memoryview(raw)[body + 4 * n :],
        int(head["crc"]),
        str(head["fingerprint"]),
        float(head["created"]),
    )


MAGIC = b"TMKVS001"
INDEX = "index.sqlite3"
SUFFIX = ".kvs"
# an unindexed file this old is a crashed writer's, not one being committed
ORPHAN_SECONDS = 60.0
_HEAD = struct.Struct("<I")  # the header's length
_WIPE_CHUNK = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS states (
    namespace TEXT NOT NULL,
    session TEXT NOT NULL,
    file TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    last_used REAL NOT NULL,
    PRIMARY KEY (namespace, session)
);
CREATE INDEX IF NOT EXISTS states_by_use ON states (last_used);
CREATE TABLE IF NOT EXISTS dropped (
    namespace TEXT NOT NULL,
    session TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (namespace, session)
);
"""
# a process keeps a state in RAM for at most its idle time (an hour by default) before
# it spills it: a drop older than this has no state left to refuse
DROPPED_KEEP_SECONDS = 7 * 24 * 3600.0


class KVStateDisk:
    """States in files under `directory`, at most `max_bytes` of them (file sizes)."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.evictions = 0
        with self._storage("open"):
            self.directory.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.directory / INDEX,
                timeout=5.0,  # a cache: a lookup waits this long at most, then misses
                check_same_thread=False,
                isolation_level=None,
            )
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(_SCHEMA)
                self._db.execute(
                    "DELETE FROM dropped WHERE at < ?", (time.time() - DROPPED_KEEP_SECONDS,)
                )
                self._remove_orphans()
            except BaseException:
                self._db.close()
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def write(self, key: StateKey, state: KVState) -> None:
        """Store `state` as the session's (replacing its previous one), then drop the
        least recently used states until the tier is under its budget. A state made
        before the session was last dropped is not stored."""
        name = f"{uuid.uuid4().hex}{SUFFIX}"
        with self._storage("write a state to"):
            size = self._write_file(name, key, state)
            for file in self._index(key, state, name, size):
                self._unlink(file)

    def _index(self, key: StateKey, state: KVState, name: str, size: int) -> list[str]:
        """Index the file `name`; the files no longer indexed (to remove)."""
        with self._lock, self._transaction():
            dropped = self._db.execute(
                "SELECT at FROM dropped WHERE namespace = ? AND session = ?", key
            ).fetchone()
            if dropped is not None and dropped[0] >= state.created:
                return [name]
            old = self._db.execute(
                "SELECT file FROM states WHERE namespace = ? AND session = ?", key
            ).fetchone()
            self._db.execute(
                "INSERT OR REPLACE INTO states VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*key, name, len(state.tokens), size, state.fingerprint, time.time()),
            )
            gone = [old[0]] if old else []
            total = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM states").fetchone()[0]
            for ns, sid, file, nbytes in self._db.execute(
                "SELECT namespace, session, file, bytes FROM states ORDER BY last_used"
            ).fetchall():
                if total <= self.max_bytes:
                    break
                self._db.execute(
                    "DELETE FROM states WHERE namespace = ? AND session = ?", (ns, sid)
                )
                gone.append(file)
                total -= nbytes
                self.evictions += 1
        return gone

    def read(self, key: StateKey) -> KVState | None:
        """The session's state, or None: none stored, the index unreadable (a cache: a
        miss), or its file unreadable (then the entry is forgotten)."""
        try:
            with self._lock:
                row = self._db.execute(
                    "SELECT file FROM states WHERE namespace = ? AND session = ?", key
                ).fetchone()
                if row is None:
                    return None
                self._db.execute(
                    "UPDATE states SET last_used = ? WHERE namespace = ? AND session = ?",
                    (time.time(), *key),
                )
        except sqlite3.Error as exc:
            log.warning("KV state index %s unreadable: %s", self.directory, exc)
            return None
        try:
            return _parse(_read(self.directory / row[0]), key)
        except _ForeignFile:  # the index is damaged: the file is another session's
            self._forget(key, row[0], unlink=False)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            self._forget(key, row[0], unlink=True)
        return None

    def drop(self, key: StateKey) -> None:
        """Forget the session's state, overwrite and remove its file, and refuse any
        state of it made until now (another process may still hold one in RAM)."""
        with self._storage("drop a state from"):
            with self._lock, self._transaction():
                row = self._db.execute(
                    "SELECT file FROM states WHERE namespace = ? AND session = ?", key
                ).fetchone()
                self._db.execute("DELETE FROM states WHERE namespace = ? AND session = ?", key)
                self._db.execute(
                    "INSERT OR REPLACE INTO dropped VALUES (?, ?, ?)", (*key, time.time())
                )
            if row is not None:
                self._wipe(row[0])

    def _forget(self, key: StateKey, file: str, unlink: bool) -> None:
        """Forget an unreadable entry (if it still names `file`: another process may have
        replaced it), removing the file if it is the session's own."""
        try:
            with self._lock, self._transaction():
                cursor = self._db.execute(
                    "DELETE FROM states WHERE namespace = ? AND session = ? AND file = ?",
                    (*key, file),
                )
            if cursor.rowcount and unlink:
                self._unlink(file)
        except sqlite3.Error as exc:
            log.warning("KV state index %s not updated: %s", self.directory, exc)

    def usage(self) -> tuple[int, int]:
        """States and bytes held (every process's)."""
        with self._storage("read"), self._lock:
            count, total = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM states"
            ).fetchone()
        return int(count), int(total)

    @contextlib.contextmanager
    def _storage(self, what: str) -> Iterator[None]:
        """File and index errors as `StorageError`, naming the folder."""
        try:
            yield
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(
                f"cannot {what} the KV state folder {self.directory}: {exc}"
            ) from exc

    def _write_file(self, name: str, key: StateKey, state: KVState) -> int:
        head = json.dumps(
            {
                "namespace": key[0],
                "session": key[1],
                "fingerprint": state.fingerprint,
                "crc": state.crc,
                "tokens": len(state.tokens),
                "created": state.created,
            }
        ).encode()
        tmp = self.directory / f".tmp-{name}"
        try:
            with tmp.open("wb") as f:
                f.write(MAGIC + _HEAD.pack(len(head)) + head)
                f.write(array("i", state.tokens).tobytes())
                f.write(state.data)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            tmp.rename(self.directory / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
        return size

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _unlink(self, file: str) -> None:
        (self.directory / file).unlink(missing_ok=True)

    def _wipe(self, file: str) -> None:
        """Overwrite the file with zeros, then remove it: a deleted session's tokens and KV
        do not stay readable on the disk's free blocks (on a file system that writes in
        place)."""
        path = self.directory / file
        try:
            with path.open("r+b") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(0)
                zeros = bytes(_WIPE_CHUNK)
                for start in range(0, size, _WIPE_CHUNK):
                    f.write(zeros[: min(_WIPE_CHUNK, size - start)])
                f.flush()
                os.fsync(f.fileno())
        except FileNotFoundError:
            return
        path.unlink(missing_ok=True)

    def _remove_orphans(self) -> None:
        """Files no row names (a writer crashed between its rename and its commit, or
        before its rename), once they are old enough not to be another process's."""
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT file FROM states")}
        cutoff = time.time() - ORPHAN_SECONDS
        for path in self.directory.iterdir():
            orphan = path.name.startswith(".tmp-") or (
                path.suffix == SUFFIX and path.name not in known
            )
            with contextlib.suppress(OSError):
                if orphan and path.stat().st_mtime < cutoff:
                    path.unlink()
