"""The example chat backend (examples/chat_backend.py) over HTTP: a conversation through
several clears with the bundled models, and, on fake models, what it does with bad
requests, library errors, crashes, oversized bodies and namespaces. The host's replies
come from stand-in responders that record what they were shown."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from examples.chat_backend import Responder, create_app
from starlette.applications import Starlette
from starlette.testclient import TestClient

import tiermem
from tests.fakes import HashingEmbedder, RecordingSummarizer, WordCounter

FACTS = [
    "My sister Marta moved to Porto for a job at the aquarium.",
    "Our new puppy is called Pico.",
    "I am allergic to peanuts, please remember that.",
    "We are repainting the kitchen a pale green colour.",
    "My running club meets on Thursday evenings.",
    "The kids want to build a bird feeder.",
    "I started learning the cello in January.",
    "We booked a cabin in the Gerês mountains for August.",
    "My favourite pastry is the pastel de nata.",
]

# fake models: no GGUF is read (the shape and window are given)
CONFIG = tiermem.KVCacheConfig(
    kv_shape=tiermem.KVShape(n_layers=2, n_kv_heads=2, head_dim=8, dtype_bytes=2),
    context_window_tokens=4096,
    summary_mode="inline",
)


class StandIn:
    """A responder that records every prompt; it raises on the message 'crash'."""

    def __init__(self, db: Path) -> None:
        self.shown: list[list[dict[str, str]]] = []
        self.db = db

    async def __call__(self, mgr: tiermem.KVCacheManager) -> Responder:
        async def respond(messages: list[dict[str, str]], session: tuple[str, str]) -> str:
            self.shown.append(messages)
            if messages[-1]["content"] == "crash":
                raise RuntimeError(f"the responder broke on {self.db}")
            return f"Noted ({len(self.shown)})."

        return respond


class FailingEmbedder(HashingEmbedder):
    """An embedding model whose file went bad: its error names the file."""

    def __init__(self, model_file: Path) -> None:
        super().__init__()
        self.model_file = model_file

    async def embed(self, texts: Any) -> np.ndarray:
        raise tiermem.ModelError(f"cannot read embedding model {self.model_file}: truncated")


def fake_app(tmp_path: Path, config: tiermem.KVCacheConfig = CONFIG, **options: Any) -> Starlette:
    db = tmp_path / "chat.db"
    return create_app(
        str(db),
        config,
        options.pop("responder", None) or StandIn(db),
        embedder=options.pop("embedder", None) or HashingEmbedder(),
        summarizer=RecordingSummarizer(),
        tokenizer=WordCounter(),
        **options,
    )


def turn(text: str, session_id: str = "s1", **fields: Any) -> dict[str, Any]:
    return {"session_id": session_id, "messages": [{"role": "user", "content": text}], **fields}


def assert_reason(response: httpx.Response, *statuses: int) -> str:
    """The response is one of `statuses` with a one-line JSON reason; the reason."""
    assert response.status_code in statuses, response.text
    reason = response.json()["error"]
    assert isinstance(reason, str) and reason.strip() and "\n" not in reason
    return reason


@pytest.mark.real_models
def test_a_conversation_through_several_clears(tmp_path: Path) -> None:
    shown: list[list[dict[str, str]]] = []
    sessions: set[tuple[str, str]] = set()

    async def responder(mgr: tiermem.KVCacheManager) -> Responder:
        async def respond(messages: list[dict[str, str]], session: tuple[str, str]) -> str:
            shown.append(messages)
            sessions.add(session)  # the session whose kept KV state a model would restore
            return f"Noted ({len(shown)})."

        return respond

    config = tiermem.KVCacheConfig(clear_after_conversations=3)
    app = create_app(str(tmp_path / "chat.db"), config, responder, maintenance_seconds=0.5)
    history: list[dict[str, str]] = []
    replies = []
    with TestClient(app) as client:
        for fact in [*FACTS, "What is the puppy called?"]:
            history.append({"role": "user", "content": fact})
            response = client.post("/chat", json={"session_id": "ana", "messages": history})
            assert response.status_code == 200, response.text
            body = response.json()
            history.append({"role": "assistant", "content": body["reply"]})
            replies.append(body)
        assert sum(r["cleared"] for r in replies) == 3
        # each turn's prompt is the bridges plus the active cache, never the whole history
        assert max(r["active_entries"] for r in replies) <= 6
        last = replies[-1]
        assert any("Pico" in text for text in last["retrieved"])
        # the retrieved message is shown in this turn's note, just before its question
        assert "Our new puppy is called Pico." in shown[-1][-2]["content"]
        assert shown[-1][-1] == {"role": "user", "content": "What is the puppy called?"}
        assert sessions == {("default", "ana")}

        assert_reason(client.post("/chat", json={"session_id": "ana", "messages": []}), 422)
        assert_reason(client.post("/chat", json=turn("   ", "ana")), 422)
        assert_reason(client.get("/sessions/nobody/summary"), 404)
        assert client.get("/status").json()["sessions"] >= 1
    # shutdown flushed everything: a restart sees the whole conversation, and a summary
    with TestClient(create_app(str(tmp_path / "chat.db"), config, responder)) as client:
        summary = client.get("/sessions/ana/summary").json()
        assert summary is not None and summary["clears"] >= 1
        assert client.delete("/sessions/ana").json() == {"deleted": True}
        assert client.delete("/sessions/ana").status_code == 404


# -- client mistakes -------------------------------------------------------------------------


def msg(**fields: Any) -> dict[str, Any]:
    return {"session_id": "s1", "messages": [{"role": "user", "content": "hi", **fields}]}


MISTAKES: dict[str, tuple[bytes | dict[str, Any], int]] = {
    "malformed JSON": (b'{"session_id": "s1",', 400),
    "empty body": (b"", 400),
    "blank body": (b" \r\n ", 400),
    "invalid UTF-8": (b'{"session_id": "s\xff\xfe1"}', 400),
    "an array": (b"[1, 2]", 400),
    "a string": (b'"hello"', 400),
    "null": (b"null", 400),
    "nested too deeply": (b"[" * 100_000, 400),
    "no messages": ({"session_id": "s1"}, 422),
    "messages not a list": ({"session_id": "s1", "messages": "hi"}, 422),
    "a message not an object": ({"session_id": "s1", "messages": ["hi"]}, 422),
    "content not a string": (msg(content=5), 422),
    "content missing": ({"session_id": "s1", "messages": [{"role": "user"}]}, 422),
    "role unknown": (msg(role="wizard"), 422),
    "role not a string": (msg(role=["user"]), 422),
    "id not a string": (msg(id=7), 422),
    "no messages in the list": ({"session_id": "s1", "messages": []}, 422),
    "blank user message": (msg(content="  \n "), 422),
    "last message not the user's": (msg(role="assistant"), 422),
    "content with a lone surrogate": (
        b'{"session_id": "s1", "messages": [{"role": "user", "content": "\\ud800"}]}',
        422,
    ),
    "session_id not a string": ({**msg(), "session_id": 5}, 422),
    "session_id missing": ({"messages": msg()["messages"]}, 422),
    "session_id empty": ({**msg(), "session_id": ""}, 422),
    "namespace not a string": ({**msg(), "namespace": ["a"]}, 422),
    "namespace empty": ({**msg(), "namespace": ""}, 422),
}


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with TestClient(fake_app(tmp_path_factory.mktemp("mistakes"))) as client:
        yield client


# a lone surrogate in a name or an id is the library's InvalidInputError: 422
SURROGATES = [
    pytest.param(body, 422, id=f"{name} with a lone surrogate")
    for name, body in {
        "session_id": b'{"session_id": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        "namespace": b'{"namespace": "\\ud800", "session_id": "s1", "messages": '
        b'[{"role": "user", "content": "hi"}]}',
        "id": b'{"session_id": "s1", "messages": [{"role": "user", "content": "hi", '
        b'"id": "\\udc00"}]}',
    }.items()
]


@pytest.mark.parametrize("body, status", MISTAKES.values(), ids=MISTAKES.keys())
def test_a_client_mistake_gets_a_reason_and_stores_nothing(
    shared_client: TestClient, body: bytes | dict[str, Any], status: int
) -> None:
    if isinstance(body, bytes):
        response = shared_client.post("/chat", content=body)
    else:
        response = shared_client.post("/chat", json=body)
    assert_reason(response, status)
    assert shared_client.get("/status").json()["sessions"] == 0


@pytest.mark.parametrize("body, status", SURROGATES)
def test_a_lone_surrogate_gets_a_reason_and_stores_nothing(
    tmp_path: Path, body: bytes, status: int
) -> None:
    with TestClient(fake_app(tmp_path)) as client:
        assert_reason(client.post("/chat", content=body), status)
        assert client.get("/status").json()["sessions"] == 0


def test_bad_names_on_the_other_routes_get_a_reason(shared_client: TestClient) -> None:
    assert_reason(shared_client.get("/sessions/s1/summary", params={"namespace": ""}), 422)
    assert_reason(shared_client.delete("/sessions/s1", params={"namespace": " "}), 422)
    assert_reason(shared_client.get("/sessions/s1/summary"), 404)
    assert_reason(shared_client.get("/no/such/route"), 404)
    wrong_method = shared_client.put("/chat", json=msg())
    assert_reason(wrong_method, 405)
    assert wrong_method.headers["allow"] == "POST"


# -- library errors ----------------------------------------------------------------------------


def test_unknown_sessions_are_404_and_a_closed_manager_is_503(tmp_path: Path) -> None:
    app = fake_app(tmp_path)
    with TestClient(app) as client:
        assert client.post("/chat", json=turn("hello")).status_code == 200
        assert client.get("/sessions/s1/summary").status_code == 200
        assert_reason(client.get("/sessions/s2/summary"), 404)
        assert_reason(client.delete("/sessions/s2"), 404)

        client.portal.call(app.state.mgr.aclose)  # type: ignore[union-attr]
        for response in (
            client.post("/chat", json=turn("hello again")),
            client.get("/sessions/s1/summary"),
            client.delete("/sessions/s1"),
            client.get("/status"),
        ):
            assert_reason(response, 503)


@contextlib.contextmanager
def write_locked(db: Path) -> Iterator[None]:
    """Another process holds the database's write lock (a sibling worker, a backup)."""
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            f"db = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        try:
            yield
        finally:
            holder.stdin.close()  # it reads to the end and exits, letting go of the lock


def test_a_storage_error_is_503_and_does_not_show_the_database_path(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    with TestClient(fake_app(tmp_path, CONFIG.replace(busy_timeout_ms=100))) as client:
        assert client.post("/chat", json=turn("hello")).status_code == 200
        with write_locked(db):
            refused = [
                client.post("/chat", json=turn("hello again")),
                client.post("/chat", json=turn("hello", "s2")),
                client.delete("/sessions/s1"),
            ]
        for response in refused:
            assert_reason(response, 503)
            assert str(tmp_path) not in response.text and "chat.db" not in response.text
        # the lock is gone: the same requests go through
        assert client.post("/chat", json=turn("hello again")).status_code == 200
        assert client.delete("/sessions/s1").json() == {"deleted": True}


def test_a_model_error_is_500_and_does_not_show_server_paths(tmp_path: Path) -> None:
    model_file = tmp_path / "models" / "embedder.safetensors"
    with TestClient(fake_app(tmp_path, embedder=FailingEmbedder(model_file))) as client:
        response = client.post("/chat", json=turn("hello"))
    assert_reason(response, 500)
    assert str(tmp_path) not in response.text and "embedder.safetensors" not in response.text


# -- crashes over a real server -----------------------------------------------------------------


class _Server(uvicorn.Server):
    """Sets `ready` once its startup has ended, listening or failed."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: Any = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()


@contextlib.contextmanager
def serving(app: Starlette) -> Iterator[str]:
    """The app under uvicorn on a free loopback port, in a thread; its base URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, http="h11", ws="none", lifespan="on", log_level="warning"
    )
    server = _Server(config)
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        assert server.ready.wait(60) and server.started, "the server did not start"
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join()


def local_address(response: httpx.Response) -> Any:
    """The client end of the connection that carried `response`."""
    return response.extensions["network_stream"].get_extra_info("client_addr")


def test_a_crash_is_a_500_and_the_connection_serves_the_next_request(tmp_path: Path) -> None:
    with (
        serving(fake_app(tmp_path)) as url,
        httpx.Client(base_url=url, limits=httpx.Limits(max_connections=1)) as client,
    ):
        crashed = client.post("/chat", json=turn("crash"))
        crashed_on = local_address(crashed)
        served = client.post("/chat", json=turn("hello"))
        served_on = local_address(served)
    assert assert_reason(crashed, 500) == "internal error"
    assert str(tmp_path) not in crashed.text
    assert served.status_code == 200 and served.json()["reply"].startswith("Noted")
    assert crashed.headers.get("connection") != "close"
    assert served_on == crashed_on  # one keep-alive connection carried both


# -- oversized bodies ------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid chat body of exactly `size` bytes."""
    body = b'{"session_id": "s1", "messages": [{"role": "user", "content": "hi"}]}'
    return body + b" " * (size - len(body))


def test_a_body_over_the_limit_is_413(tmp_path: Path) -> None:
    with TestClient(fake_app(tmp_path, max_body_bytes=4096)) as client:
        assert client.post("/chat", content=padded(4096)).status_code == 200
        # with a Content-Length, and chunked (no length given)
        assert "4096" in assert_reason(client.post("/chat", content=padded(4097)), 413)
        chunks = iter([padded(4000), b" " * 97])
        assert_reason(client.post("/chat", content=chunks), 413)
        assert client.get("/status").json()["sessions"] == 1
    with TestClient(fake_app(tmp_path)) as client:  # the default limit, 1 MiB
        assert client.post("/chat", content=padded(2**20)).status_code == 200
        assert_reason(client.post("/chat", content=padded(2**20 + 1)), 413)


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
async def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(
    tmp_path: Path, declared: bool
) -> None:
    """A 40 MB upload against a 16 KiB limit: the app stops pulling chunks at the limit
    (and pulls none when the Content-Length says it is too large)."""
    chunk, offered = b" " * 4096, 10_000
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": pulled < offered}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json")]
    if declared:
        headers.append((b"content-length", str(len(chunk) * offered).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/chat",
        "raw_path": b"/chat",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await fake_app(tmp_path, max_body_bytes=16 * 1024)(scope, receive, send)
    assert sent[0]["status"] == 413
    assert pulled == (0 if declared else 5)


def test_over_a_real_server_a_large_upload_is_413(tmp_path: Path) -> None:
    megabytes = (b" " * 2**20 for _ in range(16))
    with (
        serving(fake_app(tmp_path, max_body_bytes=4096)) as url,
        httpx.Client(base_url=url) as client,
    ):
        assert_reason(client.post("/chat", content=megabytes), 413)
        assert_reason(client.post("/chat", content=padded(2**20)), 413)
        assert client.post("/chat", content=padded(4096)).status_code == 200


# -- namespaces ------------------------------------------------------------------------------


def test_two_namespaces_stay_apart(tmp_path: Path) -> None:
    responder = StandIn(tmp_path / "chat.db")
    with TestClient(fake_app(tmp_path, responder=responder)) as client:

        def say(text: str, ns: str) -> dict[str, Any]:
            response = client.post("/chat", json=turn(text, "s1", namespace=ns))
            assert response.status_code == 200, response.text
            return response.json()

        say("Our new puppy is called Pico.", "a")
        say("Our new puppy is called Miso.", "b")
        say("My sister lives in Porto.", "default")  # what a body without a namespace gets
        answer = say("What is the puppy called?", "b")
        assert any("Miso" in text for text in answer["retrieved"])
        assert not any("Pico" in text for text in answer["retrieved"])
        assert not any("Pico" in m["content"] for m in responder.shown[-1])
        assert answer["active_entries"] == 2
        plain = client.post("/chat", json=turn("Where does my sister live?", "s1")).json()
        assert any("Porto" in text for text in plain["retrieved"])
        assert not any("puppy" in text for text in plain["retrieved"])

        assert client.get("/sessions/s1/summary", params={"namespace": "a"}).status_code == 200
        assert_reason(client.get("/sessions/s1/summary", params={"namespace": "c"}), 404)
        assert client.delete("/sessions/s1", params={"namespace": "a"}).json() == {"deleted": True}
        assert_reason(client.get("/sessions/s1/summary", params={"namespace": "a"}), 404)
        assert client.get("/sessions/s1/summary", params={"namespace": "b"}).status_code == 200
        assert client.get("/sessions/s1/summary").status_code == 200
        # b's session goes on where it was
        again = say("And what is the puppy called again?", "b")
        assert again["active_entries"] == 3
        assert any("Miso" in text for text in again["retrieved"])


def test_all_namespaces_count_in_the_status(tmp_path: Path) -> None:
    with TestClient(fake_app(tmp_path)) as client:
        for ns in ("a", "b"):
            assert client.post("/chat", json=turn("hello", namespace=ns)).status_code == 200
        assert client.get("/status").json()["sessions"] == 2


@pytest.mark.real_models
def test_the_bundled_model_keeps_each_sessions_kv_state_across_a_restart(tmp_path: Path) -> None:
    config = tiermem.KVCacheConfig(summarizer_enabled=False)
    db = str(tmp_path / "chat.db")
    history: list[dict[str, str]] = []
    with TestClient(create_app(db, config)) as client:
        for fact in FACTS[:3]:
            history.append({"role": "user", "content": fact})
            body = client.post("/chat", json={"session_id": "ana", "messages": history}).json()
            history.append({"role": "assistant", "content": body["reply"]})
        states = client.get("/status").json()["kv_states"]
        assert states["states"] == 1 and states["hits"] >= 1 and states["tokens_reused"] > 0
    # shutdown spilled the state to disk: the restarted app's first turn restores it
    with TestClient(create_app(db, config)) as client:
        history.append({"role": "user", "content": "Where do I live?"})
        client.post("/chat", json={"session_id": "ana", "messages": history})
        states = client.get("/status").json()["kv_states"]
        assert states["disk_restores"] == 1 and states["tokens_reused"] > 30
        assert client.delete("/sessions/ana").json() == {"deleted": True}
        states = client.get("/status").json()["kv_states"]
        assert states["states"] == 0 and states["disk_states"] == 0
