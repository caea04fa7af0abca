"""The example chat backend (examples/chat_backend.py), driven over HTTP through several
clears with the bundled embedding model and GGUF summarizer; the host's replies come from
a stand-in responder that records what it was shown."""

from pathlib import Path

import pytest
from examples.chat_backend import Responder, create_app
from starlette.testclient import TestClient

import tiermem

pytestmark = pytest.mark.real_models

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


def test_a_conversation_through_several_clears(tmp_path: Path) -> None:
    shown: list[list[dict[str, str]]] = []

    async def responder(mgr: tiermem.KVCacheManager) -> Responder:
        async def respond(messages: list[dict[str, str]]) -> str:
            shown.append(messages)
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
        assert "Our new puppy is called Pico." in shown[-1][0]["content"]

        assert client.post("/chat", json={"session_id": "ana", "messages": []}).status_code == 400
        empty = [{"role": "user", "content": "   "}]
        refused = client.post("/chat", json={"session_id": "ana", "messages": empty})
        assert refused.status_code == 400 and "error" in refused.json()
        assert client.get("/sessions/nobody/summary").status_code == 404
        assert client.get("/status").json()["sessions"] >= 1
    # shutdown flushed everything: a restart sees the whole conversation, and a summary
    with TestClient(create_app(str(tmp_path / "chat.db"), config, responder)) as client:
        summary = client.get("/sessions/ana/summary").json()
        assert summary is not None and summary["clears"] >= 1
        assert client.delete("/sessions/ana").json() == {"deleted": True}
        assert client.delete("/sessions/ana").status_code == 404
