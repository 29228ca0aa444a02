"""The engine loop on a thread of the server's process (serve.engine_process=false, and tests that reach into
the engine). The thread also builds the engine: all torch work of the process then happens on one thread, which
matters on CPUs, where a second thread running ops gets an OpenMP pool of its own and the two pools slow each
other down (~25% per step on two cores)."""
from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable

from chitu.engine.engine import LLMEngine
from chitu.serve.engine_core import EngineCore
from chitu.serve.engine_events import STOP, Command, Emit, Ready
from chitu.tokenizer import Tokenizer


class EngineThread:
    def __init__(self, build: Callable[[], LLMEngine]):
        self.engine: LLMEngine | None = None  # set by the thread; read-only elsewhere
        self.thread = threading.Thread(target=self._run, name="chitu-engine", daemon=True)
        self._build = build
        self._build_error: Exception | None = None
        self._ready = threading.Event()
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._emit: Emit = lambda events: None

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def start(self, emit: Emit) -> Ready:
        """Build the engine on the thread and start its loop, which hands its events to `emit` (on the thread);
        a failed build is raised here."""
        self._emit = emit
        self.thread.start()
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error
        return Ready(self.engine.max_model_tokens, self.engine.model_config.vocab_size)

    def send(self, command: Command) -> None:
        self._commands.put(command)

    def join(self) -> None:
        self.thread.join()

    def _run(self) -> None:
        try:
            self.engine = self._build()
        except Exception as e:
            self._build_error = e
            return
        finally:
            self._ready.set()
        EngineCore(self.engine, self._emit).serve(self._receive)

    def _receive(self, timeout_s: float) -> list[Command]:
        try:
            commands = [self._commands.get(timeout=timeout_s) if timeout_s else self._commands.get_nowait()]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while commands[-1] is not STOP:
                commands.append(self._commands.get_nowait())
        return commands
