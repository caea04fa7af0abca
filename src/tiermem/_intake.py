"""Taking messages in: checking them, finding which are new, and storing those (counted in
tokens, embedded, written with the session's state in one transaction) as cache entries."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import numpy as np

from . import _text as text
from ._cache import CacheEntry, entry_type
from ._config import KVCacheConfig
from ._embedder import Embedder
from ._errors import InvalidInputError, ModelError
from ._retrieval import EMBED_MAX_CHARS
from ._store import MessageKey, MessageRow, NewMessage, StateRow, Store
from ._summarizer import TokenCounter
from ._types import Message

if TYPE_CHECKING:
    from ._sessions import Session


def derived_id(session_id: str, position: int, suffix: int = 0) -> str:
    """The id of a message given without one: stable for its session and position.
    `suffix` (the first free, see `Intake.new_messages`) keeps it off a caller's own id
    that happens to look like one."""
    return f"{session_id}#{position}" + (f".{suffix}" if suffix else "")


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
            m = replace(m, metadata=metadata, created_at=created)
        out.append(m)
    return out


async def validate_off_loop(
    messages: Sequence[Message | Mapping[str, Any]], config: KVCacheConfig
) -> list[Message]:
    """`validate`, in a worker thread when megabytes of text are to be encoded and checked."""
    if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)):
        size = sum(len(m.content) for m in messages if isinstance(m, Message))
        if size > LARGE_INPUT_CHARS:
            return await anyio.to_thread.run_sync(
                validate, messages, config.max_message_bytes, config.max_metadata_bytes
            )
    return validate(messages, config.max_message_bytes, config.max_metadata_bytes)


# messages longer than this in total are hashed in a worker thread
LARGE_INPUT_CHARS = 256 * 1024


async def _hashes(messages: Sequence[Message]) -> list[str]:
    """The messages' content hashes; megabytes of text are hashed off the event loop."""

    def hash_all() -> list[str]:
        return [text.content_hash(m.role, m.content) for m in messages]

    if sum(len(m.content) for m in messages) > LARGE_INPUT_CHARS:
        return await anyio.to_thread.run_sync(hash_all)
    return hash_all()


class Intake:
    """Stores a session's new messages and makes cache entries of stored ones."""

    def __init__(
        self,
        store: Store,
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
        """The messages not stored yet, with their content hashes, each with the id it will
        be stored under (a derived one for a message sent without).

        Messages with an id match by id. The others match by content and order: `messages`
        may be the whole conversation so far, only the new messages, the client's last few
        followed by new ones, or a conversation that left the stored one (a regenerated
        reply); see `_split`. Raises `InvalidInputError` where that match is ambiguous.
        """
        hashes = await _hashes(messages)
        keys: list[SentKey] = [(m.id, h) for m, h in zip(messages, hashes, strict=True)]
        call_ids: set[str] = set()
        for m in messages:
            if m.id is not None:
                if m.id in call_ids:
                    raise InvalidInputError(f"message id {m.id!r} appears twice in one call")
                call_ids.add(m.id)
        n = session.state.message_count
        prefix = self._stored_prefix(session, keys)
        stored_ids: set[str] | None = None  # every stored id, where known without a read
        if prefix is not None and not call_ids.intersection(i for i, _ in keys[n:] if i):
            stored_ids, fresh = set(prefix), list(range(n, len(keys)))
        else:
            existing = await self._store.existing_ids(session.key, sorted(call_ids))
            for i, h in keys:
                if i is not None and i in existing and existing[i] != h:
                    raise InvalidInputError(
                        f"message id {i!r} is already stored with other content"
                    )
            fresh = list(range(len(keys)))
            if n and not call_ids.issuperset(i for i, _ in keys):  # else ids alone tell
                roles = [m.role for m in messages]
                opening = next((j for j, r in enumerate(roles) if r != "system"), len(roles))
                fresh = await self._unstored(session, keys, opening)
            fresh = [j for j in fresh if keys[j][0] not in existing]
        unnamed = [n + k for k, j in enumerate(fresh) if keys[j][0] is None]
        names = await self._derived_ids(session, unnamed, call_ids, stored_ids)
        return [
            (messages[j] if keys[j][0] else replace(messages[j], id=names[n + k]), hashes[j])
            for k, j in enumerate(fresh)
        ]

    def _stored_prefix(self, session: Session, keys: Sequence[SentKey]) -> list[str] | None:
        """The stored messages' ids if `keys` starts with the stored conversation (checked
        against its running digest, no read), else None."""
        n = session.state.message_count
        if len(keys) < n:
            return None
        ids = [i or derived_id(session.session_id, p) for p, (i, _) in enumerate(keys[:n])]
        digest = ""
        for i, (_, h) in zip(ids, keys, strict=False):
            digest = text.chain_digest(digest, i, h)
        return ids if digest == session.state.prefix_digest else None

    async def _unstored(self, session: Session, sent: Sequence[SentKey], opening: int) -> list[int]:
        """The indices of the messages in `sent` not stored yet. The `opening` system
        messages are matched on their own against those that open the stored conversation
        (a client may send its system prompt with every call, or change it); the others
        by `_overlap`."""
        same = 0
        if opening:
            first = await self._store.message_keys(session.key, opening)
            while same < len(first) and _same(sent[same], first[same]):
                same += 1
        start = opening
        if opening < len(sent):
            start += await self._overlap(session, sent[opening:])
        return [*range(same, opening), *range(start, len(sent))]

    async def _overlap(self, session: Session, sent: Sequence[SentKey]) -> int:
        """Where the new messages start in `sent` (see `_split`). Reads the stored keys at
        the end, then, only where those cannot tell, the stored messages like a sent one."""
        n, key = session.state.message_count, session.key
        stored = await self._store.message_keys(key, 2, newest_first=True)
        anchors = [k for k in range(len(sent), 0, -1) if _same(sent[k - 1], stored[-1])]
        k = anchors[0] if anchors else 0
        # (a tail over half the conversation costs what reading the like ones below does)
        if k > 0 and (k <= 2 or 2 * k <= n):
            tail = stored if k <= 2 else await self._store.message_keys(key, k, newest_first=True)
            if _ends_with({t.position: t for t in tail}, sent[:k], n):
                return k  # the client's last messages, then new ones
        if len(sent) > 2:  # two or fewer: the last two stored messages tell (see _split)
            hashes = sorted({h for i, h in sent if i is None})
            ids = sorted({i for i, _ in sent if i is not None})
            matches = await self._store.message_keys(key, like=(hashes, ids))
            merged = {k.position: k for k in [*matches, *stored]}
            stored = [merged[p] for p in sorted(merged)]
        split = _split(sent, stored, n)
        if split is None:
            raise InvalidInputError(
                f"cannot tell which of the messages sent for session {session.session_id!r} "
                "are already stored: they do not line up with the stored conversation (a "
                "message inserted or changed before stored ones?); send message ids "
                "(Message.id) so that each message can be matched"
            )
        return split

    async def _derived_ids(
        self,
        session: Session,
        positions: Sequence[int],
        call_ids: set[str],
        stored: set[str] | None,
    ) -> dict[int, str]:
        """`derived_id` for each position, with the first suffix that neither a stored
        message nor this call holds. `stored` is every stored id where known; otherwise
        the candidates are looked up."""
        names: dict[int, str] = {}
        pending, suffix = list(positions), 0
        while pending:
            wanted = {p: derived_id(session.session_id, p, suffix) for p in pending}
            if stored is None:
                held = await self._store.existing_ids(session.key, sorted(wanted.values()))
                taken = call_ids | held.keys()
            else:
                taken = call_ids | stored
            names.update((p, name) for p, name in wanted.items() if name not in taken)
            pending, suffix = [p for p in pending if p not in names], suffix + 1
        return names

    async def store(
        self,
        session: Session,
        fresh: Sequence[tuple[Message, str]],
        state: StateRow,
        embed: bool,
        also: Sequence[str] = (),
    ) -> tuple[list[CacheEntry], Any]:
        """Count tokens, embed (if `embed`), and store `fresh` with `state` in one
        transaction; the stored messages as cache entries, and the vectors of the texts
        `also` embedded with them in one batch (a turn's query; None if not `embed`)."""
        if not fresh:
            await self._store.save_state(session.key, state)
            return [], None
        contents = [m.content for m, _ in fresh]
        counts = await anyio.to_thread.run_sync(self._tokens.count, contents)
        vectors, extra = (
            await self._vectors_for([h for _, h in fresh], contents, also)
            if embed
            else (None, None)
        )
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
        return self.make_entries(stored, by_rowid), extra

    async def _vectors_for(
        self, hashes: Sequence[str], contents: Sequence[str], also: Sequence[str] = ()
    ) -> tuple[Any, Any]:
        """One vector per text: reused when the database already holds that text's vector,
        embedded (in one batch with `also`, off the event loop) otherwise; and `also`'s."""
        known = await self._store.vectors_by_hash(hashes)
        missing = sorted({h: i for i, h in enumerate(hashes) if h not in known}.values())
        extra = None
        if missing or also:
            texts = [contents[i][:EMBED_MAX_CHARS] for i in missing] + list(also)
            fresh = await self._embedder.embed(texts)
            if fresh.shape != (len(texts), self._store.dimensions):
                raise ModelError(
                    f"embedder returned shape {fresh.shape}, expected "
                    f"({len(texts)}, {self._store.dimensions})"
                )
            known.update((hashes[i], vector) for i, vector in zip(missing, fresh, strict=False))
            extra = fresh[len(missing) :]
        return np.stack([known[h] for h in hashes]).astype(np.float32, copy=False), extra

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


# -- matching what a client sends against the stored conversation ----------------------------

SentKey = tuple[str | None, str]  # a sent message's own id (or None) and content hash


def _same(sent: SentKey, stored: MessageKey) -> bool:
    """A sent message with an id is the stored one with that id; without, one with its content."""
    own_id, content_hash = sent
    if own_id is not None:
        return own_id == stored.message_id
    return content_hash == stored.content_hash


def _ends_with(stored: Mapping[int, MessageKey], sent: Sequence[SentKey], n: int) -> bool:
    """Whether the stored conversation (`n` messages, of which `stored` maps some by
    position) ends with `sent`."""
    return len(sent) <= n and all(
        (k := stored.get(n - len(sent) + i)) is not None and _same(s, k) for i, s in enumerate(sent)
    )


def _embed(sent: Sequence[SentKey], stored: Sequence[MessageKey]) -> list[int]:
    """The positions of the earliest in-order matches in `stored` of the longest prefix of
    `sent` that has them."""
    out: list[int] = []
    j = 0
    for s in sent:
        while j < len(stored) and not _same(s, stored[j]):
            j += 1
        if j == len(stored):
            break
        out.append(stored[j].position)
        j += 1
    return out


def _split(sent: Sequence[SentKey], stored: Sequence[MessageKey], n: int) -> int | None:
    """Where the new messages start in `sent`; None where that is ambiguous.

    `stored` holds, in order, the last two of the `n` stored messages and every one like a
    sent message (same content, or same id) - or only the last two where `sent` holds two
    messages or fewer. A client's conversation is the stored one less the replies it
    abandoned, so what it sends, up to its new messages, is an in-order subsequence of the
    stored conversation. An only-new call may repeat short texts by chance, so a match
    counts where it is a contiguous run ending at the stored end (a retry, a sliding
    window), or holds 2 messages followed by new ones, or 3 messages. In order of preference:

    1. The longest prefix of `sent` that is such a subsequence ending at the last stored
       message: the whole conversation (after regenerated replies), or its last few.
    2. The longest prefix that is such a subsequence ending before the last stored
       message: the client regenerated a reply (or edited a message) there, and what
       follows is new. Ambiguous where a new message is also stored after that point (an
       unknown message inserted before stored ones, or history rewritten): storing it
       would duplicate.
    3. None: all new (only the new messages were sent). Ambiguous where the last two
       stored messages appear, in order, after unknown ones.
    """
    m = len(sent)
    by_position = {k.position: k for k in stored}
    early = _embed(sent, stored[:-1])
    for k in range(m, 0, -1):
        anchored = k - 1 <= len(early) and _same(sent[k - 1], stored[-1])
        if anchored and (2 <= k < m or k >= 3 or _ends_with(by_position, sent[:k], n)):
            return k
    if 2 <= len(early) < m or len(early) >= 3:
        later = {k.content_hash for k in stored if k.position > early[-1]}
        if any(i is None and h in later for i, h in sent[len(early) :]):
            return None
        return len(early)
    if any(_ends_with(by_position, sent[j - 1 : j + 1], n) for j in range(1, m)):
        return None
    return 0
