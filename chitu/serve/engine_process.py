"""The engine loop as the main thread of a process of its own (serve.engine_process=true, the default).

The HTTP side (parsing, templating, detokenizing, formatting and writing one event per token and stream)
then never holds the interpreter lock the engine's step loop needs: at 256 streams in one process that
lock cost the engine a fifth of its speed. Commands and each turn's events cross one pipe, pickled; the
server reads events on a thread of its own and hands them to the event loops.

The child is spawned (a fresh interpreter: CUDA is never initialized in the server's process), inherits the
environment (under torchrun it is rank 0 of the process group), logs where the server logs, ignores SIGINT
and SIGTERM (the server stops it when it drains) and stops by itself when the server's end of the pipe closes.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from chitu.config.schema import ChituConfig
from chitu.errors import UserError
from chitu.serve.engine_events import STOP, Command, Emit, Event, Fatal, Ready, Receive

if TYPE_CHECKING:
    from chitu.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
STOP_TIMEOUT_S = 60  # for the engine to close after STOP (it releases the other ranks)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Built:
    ready: Ready
    tokenizer: Tokenizer | None  # the engine's, pickled: the server need not load it again


@dataclass(frozen=True)
class BuildFailed:
    error: Exception


@dataclass(frozen=True)
class LogSetup:
    """The root logger's level and handlers (files, stdout / stderr with their formats), redone in the child."""

    level: int
    handlers: list[tuple[str, str | None, str | None]]  # (file path or "stdout" / "stderr", format, date format)

    @classmethod
    def of_this_process(cls) -> LogSetup:
        handlers = []
        for handler in logging.getLogger().handlers:
            formatter = handler.formatter or logging.Formatter()
            if isinstance(handler, logging.FileHandler):
                target = handler.baseFilename
            elif isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
                target = "stdout" if handler.stream is sys.stdout else "stderr"
            else:
                continue
            handlers.append((target, formatter._fmt, formatter.datefmt))
        return cls(logging.getLogger().level, handlers)

    def apply(self) -> None:
        root = logging.getLogger()
        root.setLevel(self.level)
        for target, fmt, datefmt in self.handlers:
            handler = (logging.StreamHandler(getattr(sys, target)) if target in ("stdout", "stderr")
                       else logging.FileHandler(target))
            handler.setFormatter(logging.Formatter(fmt, datefmt))
            root.addHandler(handler)


class EngineProcess:
    def __init__(self, config: ChituConfig):
        self.tokenizer: Tokenizer | None = None  # once started
        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe()
        self._process = context.Process(target=run_engine_process, args=(config, child_end, LogSetup.of_this_process()),
                                        name="chitu-engine", daemon=True)
        self._child_end = child_end
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._stopping = False

    @property
    def is_alive(self) -> bool:
        return self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def exit_code(self) -> int | None:
        return self._process.exitcode

    def launch(self) -> None:
        """Start the process, which builds the engine meanwhile (`start` waits for it)."""
        self._process.start()
        self._child_end.close()  # the child holds it now: its exit closes the pipe

    def start(self, emit: Emit) -> Ready:
        """Launch the process unless it was, and wait until it has built the engine; a failed build is raised
        here. Its events go to `emit`, on a reader thread."""
        if self._process.pid is None:
            self.launch()
        try:
            first = self._conn.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the engine process exited with code {self._process.exitcode} while starting; "
                               f"the log above has the cause") from None
        if isinstance(first, BuildFailed):
            self._process.join()
            raise first.error
        self.tokenizer = first.tokenizer
        self._reader = threading.Thread(target=self._read, args=(emit,), name="chitu-engine-reader", daemon=True)
        self._reader.start()
        return first.ready

    def send(self, command: Command) -> None:
        if command is STOP:
            self._stopping = True
        try:
            with self._send_lock:
                self._conn.send(command)
        except OSError:
            pass  # the process is gone: the reader reports it

    def join(self) -> None:
        self._reader.join()
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("the engine process did not stop in %d s; killing it", STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join()

    def _read(self, emit: Emit) -> None:
        fatal = False
        while True:
            try:
                events: list[Event] = self._conn.recv()
            except (EOFError, OSError):
                break
            fatal = fatal or isinstance(events[-1], Fatal)  # the core emits a Fatal alone, as its last word
            emit(events)
        if not (fatal or self._stopping):
            self._process.join(STOP_TIMEOUT_S)
            logger.critical("the engine process exited with code %s", self._process.exitcode)
            cause = f"the engine process exited with code {self._process.exitcode}"
            emit([Fatal(f"{cause}; the server log has the details", cause)])


# Everything below runs in the engine's process.

def run_engine_process(config: ChituConfig, conn, log_setup: LogSetup) -> None:
    for handled in (signal.SIGINT, signal.SIGTERM):
        signal.signal(handled, signal.SIG_IGN)
    _die_with_the_server()
    log_setup.apply()
    from chitu.engine.engine import LLMEngine  # here, not above: the server imports this module too
    from chitu.serve.engine_core import EngineCore

    send = _sender(conn)
    try:
        engine = LLMEngine(config)
    except Exception as e:
        if not isinstance(e, UserError):
            logger.exception("building the engine failed")
        send(BuildFailed(_picklable(e)))
        return
    send(Built(Ready(engine.max_model_tokens, engine.model_config.vocab_size), engine.tokenizer))
    fatal = EngineCore(engine, send, _picklable).serve(_receiver(conn))
    conn.close()
    sys.exit(1 if fatal else 0)


def _die_with_the_server() -> None:
    """Be killed when the server's process ends, even while loading (Linux; elsewhere the closed pipe stops the
    loop once it runs)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != multiprocessing.parent_process().pid:  # it ended before prctl
        os._exit(1)


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _sender(conn) -> Callable[[object], None]:
    def send(message: list[Event] | Built | BuildFailed) -> None:
        try:
            conn.send(message)
        except OSError:
            pass  # the server is gone: the next receive sees the pipe closed and stops

    return send


def _receiver(conn) -> Receive:
    def receive(timeout_s: float) -> list[Command]:
        commands: list[Command] = []
        try:
            while conn.poll(timeout_s if not commands else 0):
                commands.append(conn.recv())
                if commands[-1] is STOP:
                    break
        except (EOFError, OSError):  # the server is gone: stop
            commands.append(STOP)
        return commands

    return receive
