"""A small chat backend that embeds tiermem (Starlette).

The client sends the whole conversation so far, OpenAI-style, ending with the user's new
message; tiermem stores what is new, clears and summarizes when due, and retrieves when
the message asks about the past. The reply is written from what tiermem hands back: the
bridge messages (summary, retrieved memories) and the active cache, not the whole
history. The manager opens at startup with its maintenance loop beside it, and closes
(every session flushed) at shutdown.

Run:  .venv/bin/uvicorn --factory examples.chat_backend:create_app
      curl -s localhost:8000/chat -d '{"session_id": "s1", "messages":
           [{"role": "user", "content": "My dog is called Pico."}]}'
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import tiermem
from tiermem.chat import CHAT_WINDOW, REPLY_TOKENS, chat_model, prompt

# writes the assistant's reply from the messages a model should see
Responder = Callable[[list[dict[str, str]]], Awaitable[str]]


async def bundled_responder(mgr: tiermem.KVCacheManager) -> Responder:
    """Replies from the configured GGUF (the bundled SmolLM2 by default)."""
    llm = await chat_model(mgr, "replies")

    async def respond(messages: list[dict[str, str]]) -> str:
        text, _ = await llm.complete(messages, REPLY_TOKENS, mgr.config.summary_timeout_seconds)
        return text

    return respond


def create_app(
    db: str | None = None,
    config: tiermem.KVCacheConfig | None = None,
    responder: Callable[[tiermem.KVCacheManager], Awaitable[Responder]] = bundled_responder,
    maintenance_seconds: float = 300.0,
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

    return Starlette(
        routes=[
            Route("/chat", chat, methods=["POST"]),
            Route("/sessions/{session_id}/summary", summary),
            Route("/sessions/{session_id}", delete, methods=["DELETE"]),
            Route("/status", status),
        ],
        lifespan=lifespan,
        exception_handlers={tiermem.TierMemError: refused},
    )


async def chat(request: Request) -> JSONResponse:
    body = await request.json()
    mgr: tiermem.KVCacheManager = request.app.state.mgr
    messages = body.get("messages") if isinstance(body, dict) else None
    last = messages[-1] if isinstance(messages, list) and messages else None
    if (
        not isinstance(last, dict)
        or last.get("role") != "user"
        or not str(last.get("content", "")).strip()
    ):
        raise tiermem.InvalidInputError("messages must end with the user's new message")
    sid, ns = str(body.get("session_id", "")), str(body.get("namespace", "default"))
    result = await mgr.process_conversation(sid, messages, namespace=ns)
    cache = await mgr.get_active_cache(sid, namespace=ns)
    # the bridges and retrieved messages, then the newest active entries that fit
    reply = await request.app.state.respond(prompt(result, cache, CHAT_WINDOW))
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
    found = await mgr.get_summary(request.path_params["session_id"])
    return JSONResponse(
        None if found is None else {"text": found.text, "clears": found.clear_count}
    )


async def delete(request: Request) -> JSONResponse:
    deleted = await request.app.state.mgr.delete_session(request.path_params["session_id"])
    return JSONResponse({"deleted": deleted}, status_code=200 if deleted else 404)


async def status(request: Request) -> JSONResponse:
    figures = await request.app.state.mgr.status()
    return JSONResponse({"sessions": figures.session_count, "bytes": figures.estimated_bytes})


async def refused(request: Request, exc: Exception) -> JSONResponse:
    code = 404 if isinstance(exc, tiermem.NotFoundError) else 400
    return JSONResponse({"error": str(exc)}, status_code=code)
