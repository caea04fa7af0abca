"""A small chat backend that embeds tiermem (Starlette).

The client sends the whole conversation so far, OpenAI-style, ending with the user's new
message; tiermem stores what is new, clears and summarizes when due, and retrieves when
the message asks about the past. The reply is written from what tiermem hands back: the
bridge messages (summary, retrieved memories) and the active cache, not the whole
history. The manager opens at startup with its maintenance loop beside it, and closes
(every session flushed) at shutdown.

Every route takes a `namespace` (a tenant or user; "default" when absent): in the JSON
body of POST /chat, as a query parameter elsewhere. Nothing crosses namespaces.

Errors are JSON, `{"error": "<one line>"}`: 400 for a body that is not a JSON object, 413
for one over `max_body_bytes` (refused before it is read whole), 422 for fields that are
wrong, 404 for an unknown session, 503 while the store is unavailable or the server is
shutting down, 500 otherwise. Server-side failures are logged in full and answered
without their details (tiermem's messages name database and model paths).

Run:  .venv/bin/uvicorn --factory examples.chat_backend:create_app
      curl -s localhost:8000/chat -d '{"session_id": "s1", "messages":
           [{"role": "user", "content": "My dog is called Pico."}]}'
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import tiermem

log = logging.getLogger(__name__)

REPLY_TOKENS = 160  # the longest reply the bundled model writes

# writes the assistant's reply from the messages a model should see, for a (namespace,
# session): a model that keeps KV states restores the session's instead of prefilling
Responder = Callable[[list[dict[str, str]], tuple[str, str]], Awaitable[str]]
Endpoint = Callable[[Request], Awaitable[JSONResponse]]


async def bundled_responder(mgr: tiermem.KVCacheManager) -> Responder:
    """Replies from the configured GGUF (the bundled SmolLM2 by default)."""
    llm = await tiermem.open_chat_model(mgr, "replies")

    async def respond(messages: list[dict[str, str]], session: tuple[str, str]) -> str:
        text, _ = await llm.complete(
            messages, REPLY_TOKENS, mgr.config.summary_timeout_seconds, session=session
        )
        return text

    return respond


def create_app(
    db: str | None = None,
    config: tiermem.KVCacheConfig | None = None,
    responder: Callable[[tiermem.KVCacheManager], Awaitable[Responder]] = bundled_responder,
    maintenance_seconds: float = 300.0,
    max_body_bytes: int = 1024 * 1024,
    **models: Any,
) -> Starlette:
    """The app; `models` (embedder, summarizer, ...) go to `KVCacheManager.open`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        path = db or os.environ.get("CHAT_DB", "chat_backend.db")
        async with await tiermem.KVCacheManager.open(path, config, **models) as mgr:
            app.state.mgr, app.state.respond = mgr, await responder(mgr)
            async with anyio.create_task_group() as tg:
                tg.start_soon(mgr.run_maintenance, maintenance_seconds)
                yield
                tg.cancel_scope.cancel()

    app = Starlette(
        routes=[
            Route("/chat", answered(chat), methods=["POST"]),
            Route("/sessions/{session_id}/summary", answered(summary)),
            Route("/sessions/{session_id}", answered(delete), methods=["DELETE"]),
            Route("/status", answered(status)),
        ],
        lifespan=lifespan,
        # Starlette's own refusals (unknown path, wrong method) as JSON too
        exception_handlers={HTTPException: error_response},
    )
    app.state.max_body_bytes = max_body_bytes
    return app


async def chat(request: Request) -> JSONResponse:
    body = await read_json(request)
    mgr: tiermem.KVCacheManager = request.app.state.mgr
    sid, ns = text_field(body, "session_id"), text_field(body, "namespace", "default")
    raw = body.get("messages")
    if not isinstance(raw, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in raw
    ):
        raise HTTPException(422, "messages must be a list of {role, content} string objects")
    # Message checks the role's value and the id (InvalidInputError, a 422, when wrong)
    messages = [tiermem.Message(m["role"], m["content"], m.get("id")) for m in raw]
    if not messages or messages[-1].role != "user" or not messages[-1].content.strip():
        raise HTTPException(422, "messages must end with the user's new message")
    result = await mgr.process_conversation(sid, messages, namespace=ns)
    cache = await mgr.get_active_cache(sid, namespace=ns)
    # laid out stable-first: the session's kept KV state covers all but this turn's part
    prompt = tiermem.build_prompt(result, cache, user_message=messages[-1].content)
    reply = await request.app.state.respond(prompt, (ns, sid))
    clear = result.clear_result
    return JSONResponse(
        {
            "reply": reply,
            "cleared": clear is not None,
            "clear_reason": clear.clear_reason.value if clear else None,
            "bridge_messages": result.bridge_messages,
            "retrieved": [e.text for e in result.retrieval_result.entries]
            if result.retrieval_result
            else [],
            "active_entries": len(cache),
        }
    )


async def summary(request: Request) -> JSONResponse:
    mgr: tiermem.KVCacheManager = request.app.state.mgr
    found = await mgr.get_summary(request.path_params["session_id"], namespace=namespace(request))
    return JSONResponse(
        None if found is None else {"text": found.text, "clears": found.clear_count}
    )


async def delete(request: Request) -> JSONResponse:
    mgr: tiermem.KVCacheManager = request.app.state.mgr
    sid, ns = request.path_params["session_id"], namespace(request)
    if not await mgr.delete_session(sid, namespace=ns):
        raise HTTPException(404, f"unknown session {sid!r} in namespace {ns!r}")
    return JSONResponse({"deleted": True})


async def status(request: Request) -> JSONResponse:
    """The whole manager's figures (all namespaces), with the reply model's kept KV states
    (RAM and disk tiers, hits, tokens reused) when it keeps them."""
    figures = await request.app.state.mgr.status()
    states = figures.kv_states
    return JSONResponse(
        {
            "sessions": figures.session_count,
            "bytes": figures.estimated_bytes,
            "kv_states": dataclasses.asdict(states) if states is not None else None,
        }
    )


# -- reading requests ----------------------------------------------------------------------


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object; one over the limit is refused as soon as it passes it,
    by its Content-Length or while it streams in, so it is never held whole."""
    limit: int = request.app.state.max_body_bytes
    too_large = HTTPException(413, f"the body is over the limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    if not body.strip():
        raise HTTPException(400, "the body is empty; send a JSON object")
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPException(400, "the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise HTTPException(400, f"the body is not JSON: {exc.msg} at offset {exc.pos}") from None
    except RecursionError:
        raise HTTPException(400, "the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return data


def text_field(body: dict[str, Any], name: str, default: str | None = None) -> str:
    value = body.get(name, default)
    if not isinstance(value, str):
        raise HTTPException(422, f"{name} must be a string")
    return value


def namespace(request: Request) -> str:
    return request.query_params.get("namespace", "default")


# -- answering errors ----------------------------------------------------------------------

# (error, status, what the client is told); None: the error's own message, which is about
# the client's input. The others' messages may name server files: they go to the log only.
ERRORS: list[tuple[type[Exception], int, str | None]] = [
    (tiermem.NotFoundError, 404, None),
    (tiermem.InvalidInputError, 422, None),
    (tiermem.ManagerClosedError, 503, "the server is shutting down"),
    (tiermem.StorageError, 503, "the memory store is unavailable; try again"),
    (tiermem.BudgetError, 503, "the server is out of memory; try again"),
    (tiermem.ModelError, 500, "a model failed"),
    (Exception, 500, "internal error"),
]


def answered(endpoint: Endpoint) -> Endpoint:
    """The endpoint, answering every error itself. Starlette's handler for `Exception`
    answers and then re-raises, and uvicorn then drops the keep-alive connection."""

    async def answering(request: Request) -> JSONResponse:
        try:
            return await endpoint(request)
        except Exception as exc:
            return await error_response(request, exc)

    return answering


async def error_response(request: Request, exc: Exception) -> JSONResponse:
    headers = None
    if isinstance(exc, HTTPException):
        status, reason, headers = exc.status_code, exc.detail, exc.headers
    else:
        status, told = next((s, r) for kind, s, r in ERRORS if isinstance(exc, kind))
        if told is None:
            reason = str(exc)
        else:
            reason = told
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    one_line = " ".join(reason.split())[:300]  # it may quote what the client sent
    return JSONResponse({"error": one_line}, status_code=status, headers=headers)
