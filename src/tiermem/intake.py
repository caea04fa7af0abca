"""Taking messages in: checking them, finding which are new, and storing those (counted in
tokens, embedded, written with the session's state in one transaction) as cache entries."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import numpy as np

from . import text
from .cache import CacheEntry, entry_type
from .embedder import Embedder
from .errors import InvalidInputError, ModelError
from .retrieval import EMBED_MAX_CHARS
from .store import MessageRow, NewMessage, SQLiteStore, StateRow
from .summarizer import TokenCounter
from .types import Message

if TYPE_CHECKING:
    from .sessions import Session


def derived_id(session_id: str, position: int) -> str:
    """The id of a message given without one: stable for its session and position."""
    return f"{session_id}#{position}"


MAX_NAME_CHARS = 512


def check_name(what: str, value: object) -> None:
    """A session id, namespace or message id: a non-empty string of at most 512 characters,
    valid Unicode, no NUL."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{what} must be a non-empty string")
    if len(value) > MAX_NAME_CHARS or "\x00" in value:
        raise InvalidInputError(f"{what} must be at most {MAX_NAME_CHARS} characters with no NUL")
    check_text(what, value, 4 * MAX_NAME_CHARS)


def check_text(what: str, value: str, max_bytes: int) -> None:
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be str, not {type(value).__name__}")
    if len(value) > max_bytes:  # at least one byte a character: refused without encoding
        raise InvalidInputError(f"{what} is over {max_bytes} bytes; the limit is {max_bytes}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{what} is not valid Unicode text (lone surrogate)") from exc
    if size > max_bytes:
        raise InvalidInputError(f"{what} is {size} bytes; the limit is {max_bytes}")


def check_metadata(metadata: Mapping[Any, Any], max_bytes: int) -> dict[str, Any]:
    """Metadata as a plain dict that JSON can hold (string keys, no cycles), within
    `max_bytes` once encoded; values JSON cannot hold are stored as their `str`."""
    if any(not isinstance(k, str) for k in metadata):
        raise InvalidInputError("metadata keys must be strings")
    try:
        encoded = json.dumps(dict(metadata), default=str, ensure_ascii=False)
        size = len(encoded.encode("utf-8"))
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as exc:
        raise InvalidInputError(f"metadata cannot be stored as JSON: {exc}") from exc
    if size > max_bytes:
        raise InvalidInputError(f"metadata is {size} bytes as JSON; the limit is {max_bytes}")
    loaded: dict[str, Any] = json.loads(encoded)
    return loaded


def check_time(value: datetime) -> datetime:
    """An aware UTC datetime (a naive one is read as UTC), anywhere in years 1-9999."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    try:
        return aware.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise InvalidInputError(f"created_at {value!r} is out of range") from exc


def validate(
    messages: Sequence[Message | Mapping[str, Any]],
    max_bytes: int,
    max_metadata_bytes: int = 64 * 1024,
) -> list[Message]:
    """`messages` as `Message`s, each checked and normalised (ids, text, metadata as JSON-
    ready dicts, created_at as aware UTC); raises `InvalidInputError` on the first bad one."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidInputError("messages must be a list of Message")
    out = []
    for m in messages:
        if isinstance(m, Mapping):
            if any(not isinstance(k, str) for k in m):
                raise InvalidInputError("a message mapping must have string keys")
            try:
                m = Message(**m)
            except TypeError as exc:
                raise InvalidInputError(f"not a message: {exc}") from exc
        if not isinstance(m, Message):
            raise InvalidInputError(f"expected a Message, got {type(m).__name__}")
        check_text("message content", m.content, max_bytes)
        if m.id is not None:
            check_name("message id", m.id)
        metadata = m.metadata
        if metadata is not None:
            metadata = check_metadata(metadata, max_metadata_bytes)
        created = check_time(m.created_at) if m.created_at is not None else None
        if metadata is not m.metadata or created is not m.created_at:
            m = dataclasses.replace(m, metadata=metadata, created_at=created)
        out.append(m)
    return out


class Intake:
    """Stores a session's new messages and makes cache entries of stored ones."""

    def __init__(
        self,
        store: SQLiteStore,
        embedder: Embedder,
        tokens: TokenCounter,
        bytes_per_token: int,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._embedder = embedder
        self._tokens = tokens
        self._per_token = bytes_per_token
        self._clock = clock

    async def new_messages(
        self, session: Session, messages: Sequence[Message]
    ) -> list[tuple[Message, str]]:
        """The messages not stored yet, with their content hashes.

        A list that starts with the stored conversation is the whole conversation (only its
        tail is new); otherwise every message is new unless its id is already stored.
        """
        hashes = [text.content_hash(m.role, m.content) for m in messages]
        n = session.state.message_count
        if n and len(messages) >= n:
            digest = ""
            for i in range(n):
                own_id = messages[i].id or derived_id(session.session_id, i)
                digest = text.chain_digest(digest, own_id, hashes[i])
            if digest == session.state.prefix_digest:
                return list(zip(messages[n:], hashes[n:], strict=True))
        seen: set[str] = set()
        for m in messages:
            if m.id is not None:
                if m.id in seen:
                    raise InvalidInputError(f"message id {m.id!r} appears twice in one call")
                seen.add(m.id)
        existing = await self._store.existing_ids(session.key, sorted(seen))
        out = []
        for m, h in zip(messages, hashes, strict=True):
            if m.id is not None and m.id in existing:
                if existing[m.id] != h:
                    raise InvalidInputError(
                        f"message id {m.id!r} is already stored with other content"
                    )
                continue
            out.append((m, h))
        return out

    async def store(
        self,
        session: Session,
        fresh: Sequence[tuple[Message, str]],
        state: StateRow,
        embed: bool,
    ) -> list[CacheEntry]:
        """Count tokens, embed (if `embed`), and store `fresh` with `state` in one
        transaction; the stored messages as cache entries."""
        if not fresh:
            await self._store.save_state(session.key, state)
            return []
        contents = [m.content for m, _ in fresh]
        counts = await anyio.to_thread.run_sync(self._tokens.count, contents)
        vectors = await self._vectors_for([h for _, h in fresh], contents) if embed else None
        now = self._clock()
        rows, digest, position = [], state.prefix_digest, state.message_count
        for (m, h), tokens in zip(fresh, counts, strict=True):
            message_id = m.id or derived_id(session.session_id, position)
            digest = text.chain_digest(digest, message_id, h)
            created = m.created_at.timestamp() if m.created_at else now
            meta = json.dumps(dict(m.metadata), ensure_ascii=False) if m.metadata else None
            rows.append(
                NewMessage(position, message_id, m.role, m.content, h, meta, created, tokens)
            )
            position += 1
        state.prefix_digest, state.message_count = digest, position
        rowids = await self._store.append_messages(session.key, rows, vectors, state)
        stored = [
            MessageRow(
                rid,
                r.position,
                r.message_id,
                r.role,
                r.content,
                r.created_at,
                r.token_count,
                r.metadata,
            )
            for rid, r in zip(rowids, rows, strict=True)
        ]
        by_rowid = {} if vectors is None else dict(zip(rowids, vectors, strict=True))
        return self.make_entries(stored, by_rowid)

    async def _vectors_for(self, hashes: Sequence[str], contents: Sequence[str]) -> Any:
        """One vector per text: reused when the database already holds that text's vector,
        embedded (in one batch, off the event loop) otherwise."""
        known = await self._store.vectors_by_hash(hashes)
        missing = sorted({h: i for i, h in enumerate(hashes) if h not in known}.values())
        if missing:
            fresh = await self._embedder.embed([contents[i][:EMBED_MAX_CHARS] for i in missing])
            if fresh.shape != (len(missing), self._store.dimensions):
                raise ModelError(
                    f"embedder returned shape {fresh.shape}, expected "
                    f"({len(missing)}, {self._store.dimensions})"
                )
            known.update((hashes[i], vector) for i, vector in zip(missing, fresh, strict=True))
        return np.stack([known[h] for h in hashes]).astype(np.float32, copy=False)

    async def entries(self, rows: Sequence[MessageRow], with_vectors: bool) -> list[CacheEntry]:
        """Cache entries of stored messages, with their stored vectors if asked."""
        vectors: Mapping[int, Any] = {}
        if with_vectors:
            vectors = await self._store.message_vectors([r.rowid for r in rows])
        return self.make_entries(rows, vectors)

    def make_entries(
        self, rows: Sequence[MessageRow], vectors: Mapping[int, Any]
    ) -> list[CacheEntry]:
        return [
            CacheEntry(
                rowid=r.rowid,
                message_id=r.message_id,
                position=r.position,
                role=r.role,
                content=r.content,
                created_at=r.created_at,
                token_count=r.token_count,
                kv_bytes=r.token_count * self._per_token,
                entry_type=entry_type(r.role, r.content),
                vector=vectors.get(r.rowid),
            )
            for r in rows
        ]
