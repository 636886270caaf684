"""AsyncLLMEngine: the LLMEngine's step loop on a background thread, one async stream per request.

    event loop (server)                       engine thread (owns the LLMEngine)
    -------------------                       ----------------------------------
    add_request()  --- command ------------->  engine.add_request() (validates; raises ValueError)
                   <-- future --------------
    RequestStream  <-- call_soon_threadsafe --  engine.step() -> RequestOutputs of the step
    stream.abort() --- command ------------->  engine.abort_request() (blocks freed at once)

LLMEngine is not thread-safe, so every call into it runs on the engine thread: the event loop
only enqueues commands (closures over the engine) and is handed results through futures. The
loop never waits on a model step; a step never waits on the loop.

Outputs are cumulative (text and token ids only grow), so a stream keeps just the latest one: a
consumer that falls behind skips intermediate snapshots and loses nothing.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine, PromptType
from tokenmill.engine.metrics import EngineStats
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

_IDLE_POLL_S = 0.005  # wait when requests are live but the scheduler found nothing to run
_LEASE_POLL_S = 0.05  # with no request but KV blocks leased to decode instances: how often to free them


class QueueFullError(RuntimeError):
    """The waiting queue holds max_queued_requests already (the server answers 503)."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error or was shut down; no request can be served."""


class OutputListener(Protocol):
    """Called on the engine thread: what each step produced, and each abort of a live request."""

    def on_outputs(self, outputs: list[RequestOutput]) -> None: ...

    def on_abort(self, request_id: str) -> None: ...


class RequestStream:
    """The async iterator of one request's RequestOutputs; ends after the finished one."""

    def __init__(self, request_id: str, engine: "AsyncLLMEngine") -> None:
        self.request_id = request_id
        self._engine = engine
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        self._closed = False  # aborted, or its finished output was delivered

    @property
    def finished(self) -> bool:
        return self._closed

    def put(self, output: RequestOutput) -> None:
        """The request's latest output (it replaces one not yet read)."""
        self._latest = output
        self._event.set()

    def fail(self, error: BaseException) -> None:
        """End the stream with `error`, raised to its reader."""
        self._error = error
        self._event.set()

    def close(self) -> None:
        """End the stream: its reader stops (after any output already put)."""
        self._closed = True
        self._event.set()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._latest is not None:
                out, self._latest = self._latest, None
                if out.finished:
                    self._closed = True
                return out
            if self._error is not None:
                self._closed = True
                raise self._error
            if self._closed:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()

    def abort(self) -> None:
        """Stop the request (no-op once finished); its blocks are freed before the next step."""
        if not self._closed:
            self.close()
            self._engine.abort(self.request_id)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, listener: OutputListener | None = None) -> None:
        self.engine = engine
        self.listener = listener
        # Read-only once the engine is built, so any thread may read them.
        self.config = engine.config
        self.vocab_size = engine.vocab_size
        self.max_queued_requests = engine.config.max_queued_requests
        self._streams: dict[str, RequestStream] = {}  # touched on the event loop only
        self._live: set[str] = set()  # added and not finished; touched on the engine thread only
        self._commands: list[tuple[Callable[[], Any], concurrent.futures.Future | None]] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self._stats = engine.stats()

    @classmethod
    def from_engine_args(cls, listener: OutputListener | None = None, **kwargs) -> "AsyncLLMEngine":
        return cls(LLMEngine(EngineConfig.from_kwargs(**kwargs)), listener)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; outputs are delivered to the running event loop."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self.engine.close()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def stats(self) -> EngineStats:
        """The engine's figures as of its last step or command (any thread, never blocks)."""
        return self._stats

    def get_tokenizer(self):
        """The engine's tokenizer. NOTE: the engine thread uses it; a caller on another thread must
        use a copy (Rust tokenizers must not be used from two threads at once)."""
        return self.engine.tokenizer

    def queue_is_full(self) -> bool:
        """max_queued_requests requests wait to be scheduled (the scheduler's num_waiting: swapped
        requests, already admitted once, do not count). Read on the engine thread."""
        limit = self.max_queued_requests
        return limit is not None and self.engine.stats().scheduler.num_waiting >= limit

    # ---- requests ----------------------------------------------------------------------------

    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          priority: int = 0, tenant: str = "default",
                          arrival_time: float | None = None, kv_transfer_params: dict | None = None) -> RequestStream:
        """Queue a request and return its stream; raises ValueError on bad input, QueueFullError
        when the waiting queue is full and EngineDeadError when the engine loop is gone."""
        arrival_time = time.time() if arrival_time is None else arrival_time
        stream = RequestStream(request_id, self)

        def add() -> None:
            if self.queue_is_full():
                raise QueueFullError(f"the waiting queue is full ({self.max_queued_requests} requests); retry later")
            self.engine.add_request(request_id, prompt, params, priority=priority, arrival_time=arrival_time,
                                    tenant=tenant, kv_transfer_params=kv_transfer_params)
            self._live.add(request_id)

        # NOTE: registered before the add runs, so no output of the request can arrive unclaimed.
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._streams[request_id] = stream
        try:
            await self._submit(add)
        except asyncio.CancelledError:
            # The add may still go through: the abort queued behind it stops the request then.
            self.abort(request_id)
            raise
        except BaseException:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            raise
        return stream

    async def generate(self, request_id: str, prompt: PromptType, params: SamplingParams,
                       priority: int = 0, tenant: str = "default") -> AsyncIterator[RequestOutput]:
        """add_request + iterate. Closing the generator early aborts the request: cancellation
        does so at once; after a `break`, wrap it in contextlib.aclosing (or call aclose()) so the
        abort doesn't wait for garbage collection."""
        stream = await self.add_request(request_id, prompt, params, priority, tenant)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Abort a request from the event loop (fire and forget)."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.close()

        def abort() -> None:  # on the engine thread
            if request_id in self._live:
                self._live.discard(request_id)
                self.engine.abort_request(request_id)
                if self.listener is not None:
                    self.listener.on_abort(request_id)

        if self.error is None and not self._stopping:
            self._enqueue(abort)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps and return its result."""
        return await self._submit(lambda: fn(self.engine))

    # ---- the engine thread ---------------------------------------------------------------------

    def _enqueue(self, command: Callable[[], Any], future: concurrent.futures.Future | None = None) -> None:
        with self._cv:
            if not self._stopping:
                self._commands.append((command, future))
                self._cv.notify()
                return
        if future is not None and future.set_running_or_notify_cancel():
            future.set_exception(EngineDeadError(f"the engine is not running ({self.error or 'shut down'})"))

    async def _submit(self, fn: Callable[[], Any]) -> Any:
        if self.error is not None or self._stopping:
            raise EngineDeadError(f"the engine is not running ({self.error or 'shut down'})")
        if self._thread is None:
            self.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._enqueue(fn, future)
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cv:
                    while not self._commands and not self._stopping and not engine.has_unfinished_requests():
                        if engine.has_pending_kv_work():  # step (below) frees the leases read or expired
                            self._cv.wait(_LEASE_POLL_S)
                            break
                        self._cv.wait()
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, []
                for fn, future in commands:
                    self._execute(fn, future)
                if engine.has_unfinished_requests() or engine.has_pending_kv_work():
                    steps_before = engine.num_steps
                    outputs = engine.step()
                    self._stats = engine.stats()
                    if outputs:
                        self._publish(outputs)
                    elif engine.num_steps == steps_before:
                        with self._cv:  # nothing could be scheduled: don't spin
                            if not self._commands:
                                self._cv.wait(_IDLE_POLL_S)
        except BaseException as e:  # a bug in a step: fail every stream rather than hang them
            self.error = e
            self._stop(EngineDeadError(f"engine loop failed: {type(e).__name__}: {e}"))
            raise
        self._stop(EngineDeadError("the engine was shut down"))

    def _execute(self, fn: Callable[[], Any], future: concurrent.futures.Future | None) -> None:
        # NOTE: the stats snapshot is refreshed before the caller hears back (and, after a step,
        # before its outputs are delivered), so what a client saw happen is already in /metrics.
        if future is None:
            fn()
            self._stats = self.engine.stats()
        elif future.set_running_or_notify_cancel():
            try:
                result = fn()
            except Exception as e:  # bad input: handed to the caller, not fatal to the loop
                future.set_exception(e)
            else:
                self._stats = self.engine.stats()
                future.set_result(result)

    def _stop(self, error: EngineDeadError) -> None:
        with self._cv:
            self._stopping = True
            commands, self._commands = self._commands, []
        for _, future in commands:
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(error)
        self._fail_all(error)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
        if self.listener is not None:
            self.listener.on_outputs(outputs)
        self._call_on_loop(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:  # on the event loop
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            if not stream.finished:
                stream.put(out)

    def _fail_all(self, error: BaseException) -> None:
        def fail() -> None:
            streams = list(self._streams.values())
            self._streams.clear()
            for stream in streams:
                stream.fail(error)

        self._call_on_loop(fail)

    def _call_on_loop(self, fn: Callable, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop closed in between
                pass
