"""Reading a JSONL file to ingest: every line checked (encoding, JSON, each field) before
anything is stored, each mistake one line naming where it is."""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from typing import Any

from ._errors import InvalidInputError, NotFoundError, TierMemError
from ._intake import MAX_NAME_CHARS
from ._types import DEFAULT_NAMESPACE, ROLES, Message

MAX_DEPTH = 100  # levels of nesting in a line's metadata

FIELDS = frozenset({"session_id", "namespace", "role", "content", "id", "created_at", "metadata"})


def shown(value: object, width: int = 40) -> str:
    """`value` for an error message: its repr, cut short (a bad line can be megabytes)."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def kind(value: object) -> str:
    """The JSON name of `value`'s type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def check_unicode(what: str, value: str) -> None:
    """A lone surrogate (from JSON's \\ud800 or a non-UTF-8 argument) is not text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{what} is not valid Unicode (a lone surrogate)") from exc


def check_name(what: str, value: object) -> str:
    """A session id, namespace or message id: a non-blank string, valid Unicode, no NUL."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string, not {kind(value)}")
    if not value.strip():
        raise InvalidInputError(f"{what} is empty")
    check_unicode(what, value)
    if "\x00" in value:
        raise InvalidInputError(f"{what} contains a NUL character")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidInputError(f"{what} is longer than {MAX_NAME_CHARS} characters")
    return value


def check_json(what: str, value: object, depth: int = 0) -> None:
    """Every string in `value` valid Unicode, every number finite (JSON's own rules), and
    not so deeply nested that storing it (as JSON again) would overflow Python's stack."""
    if depth > MAX_DEPTH:
        raise InvalidInputError(f"{what} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        check_unicode(what, value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidInputError(f"{what} holds a number too large for JSON")
    elif isinstance(value, list):
        for item in value:
            check_json(what, item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(f"a key in {what}", key)
            check_json(what, item, depth + 1)


def check_date(value: object) -> datetime | None:
    """`created_at`: null, or an ISO 8601 date that the database can store and give back."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"created_at must be an ISO 8601 date string, not {kind(value)}")
    try:
        when = datetime.fromisoformat(value)
    except ValueError as exc:  # Python's reason, unless it only repeats the value
        reason = "" if str(exc).startswith("Invalid isoformat") else f" ({exc})"
        raise InvalidInputError(
            f"created_at {shown(value)} is not an ISO 8601 date{reason}"
        ) from exc
    try:  # stored as a POSIX timestamp, read back as a UTC datetime
        datetime.fromtimestamp(when.timestamp(), UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise InvalidInputError(f"created_at {shown(value)} is out of range") from exc
    return when


def parse_line(raw: bytes, first: bool) -> dict[str, Any]:
    """One JSONL line as a JSON object: UTF-8 (a BOM allowed on the first line), strict JSON
    (no NaN or Infinity), strings valid Unicode."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"not UTF-8 text (byte {exc.start + 1} of the line)") from exc

    def constant(name: str) -> Any:
        raise InvalidInputError(f"not JSON ({name} is not a JSON number)")

    try:
        row = json.loads(line, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"not JSON ({exc.msg}, column {exc.colno})") from exc
    except ValueError as exc:  # Python refuses integers of thousands of digits
        raise InvalidInputError("not JSON (a number with too many digits)") from exc
    except RecursionError as exc:
        raise InvalidInputError("not JSON (nested too deeply)") from exc
    if not isinstance(row, dict):
        raise InvalidInputError(f"expected a JSON object, not {kind(row)}")
    for field, value in row.items():
        check_unicode("a field name", field)
        check_json(field, value)
    return row


def to_message(row: dict[str, Any], max_bytes: int) -> Message:
    """The message of a parsed line, every field checked here (the CLI's promise does not
    depend on what the library checks)."""
    unknown = sorted(set(row) - FIELDS)
    if unknown:
        raise InvalidInputError(f"unknown fields {', '.join(map(shown, unknown[:5]))}")
    for field in ("role", "content"):
        if field not in row:
            raise InvalidInputError(f"no {field!r} (each line needs role and content)")
    role, content = row["role"], row["content"]
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidInputError(
            f"role must be one of {', '.join(sorted(ROLES))}, not {shown(role)}"
        )
    if not isinstance(content, str):
        raise InvalidInputError(f"content must be a string, not {kind(content)}")
    size = len(content.encode("utf-8"))
    if size > max_bytes:
        raise InvalidInputError(f"content is {size} bytes; the limit is {max_bytes}")
    mid = row.get("id")
    if mid is not None:
        check_name("id", mid)
    metadata = row.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidInputError(f"metadata must be an object, not {kind(metadata)}")
    created = check_date(row.get("created_at"))
    return Message(role, content, id=mid, metadata=metadata, created_at=created)


def read_jsonl(
    path: str, session: str | None, max_bytes: int
) -> dict[tuple[str, str], list[Message]]:
    """Messages by (namespace, session), in file order; every line checked before any is
    stored."""
    if os.path.isdir(path):
        raise InvalidInputError(f"{path} is a folder, not a JSONL file")
    by_session: dict[tuple[str, str], list[Message]] = {}
    ids: dict[tuple[str, str], dict[str, int]] = {}  # message id -> line, per session
    # a line holds one message: its content (JSON may escape a byte as 6) and a little more
    longest = 6 * max_bytes + 2**20
    with open(path, "rb") as lines:
        for number, raw in enumerate(iter(lambda: lines.readline(longest + 1), b""), start=1):
            if len(raw) > longest:
                raise InvalidInputError(
                    f"{path}:{number}: longer than {longest} bytes (JSONL is one message a line)"
                )
            if not raw.strip():
                continue
            try:
                row = parse_line(raw, number == 1)
                sid = row.pop("session_id", None)
                sid = session if sid is None else check_name("session_id", sid)
                if sid is None:
                    raise InvalidInputError("no session_id (or pass --session)")
                ns = row.pop("namespace", None)
                ns = DEFAULT_NAMESPACE if ns is None else check_name("namespace", ns)
                message = to_message(row, max_bytes)
            except TierMemError as exc:
                raise InvalidInputError(f"{path}:{number}: {exc}") from exc
            seen = ids.setdefault((ns, sid), {})
            if message.id is not None:
                if message.id in seen:
                    raise InvalidInputError(
                        f"{path}:{number}: id {shown(message.id)} is already used on line "
                        f"{seen[message.id]} for session {shown(sid)}"
                    )
                seen[message.id] = number
            by_session.setdefault((ns, sid), []).append(message)
    if not by_session:
        raise InvalidInputError(f"{path} holds no messages")
    return by_session


async def check_stored(mgr: Any, by_session: dict[tuple[str, str], list[Message]]) -> None:
    """Refuse the file if one of its ids is stored with other content: found before any
    session is written (and without loading one), so a failed ingest changes nothing."""
    for (ns, sid), messages in by_session.items():
        given = {m.id: m for m in messages if m.id is not None}
        if not given:
            continue
        try:
            history = await mgr.get_conversation_history(sid, namespace=ns)
        except NotFoundError:
            continue
        for stored in history:
            new = given.get(stored.id)
            if new is not None and (new.role, new.content) != (stored.role, stored.content):
                raise InvalidInputError(
                    f"id {shown(stored.id)} of session {shown(sid)} is already stored "
                    "with other content"
                )
