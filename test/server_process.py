"""A real `python -m chitu` (or `torchrun … -m chitu`) for the service tests: it takes a free port itself
(serve.port=0), and its URL is read from the line it logs once it listens."""
from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from process_tree import ProcessTree

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 300
SERVING = re.compile(r"Serving model \S+ on (http://\S+:\d+) \(OpenAI API under /v1\)")


class ServerProcess:
    """The server, logging to `run_dir`/server.log; `stop()` sends SIGTERM. Use it in `with`: on leaving,
    whatever is left of it (every torchrun rank included) is stopped."""

    def __init__(self, run_dir: Path, *overrides: str, launcher: tuple[str, ...] = (sys.executable,),
                 cwd: Path = REPO):
        self.log_path = run_dir / "server.log"
        command = [*launcher, "-m", "chitu", "serve.port=0", "serve.host=127.0.0.1", f"hydra.run.dir={run_dir}",
                   *overrides]
        with open(self.log_path, "w") as log:
            self.process = ProcessTree(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.url = self._wait_ready()
        except BaseException:
            self.process.stop_tree()
            raise

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.process.stop_tree()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        url = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log()}")
            url = url or self._logged_url()
            if url is not None:
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(f"{url}/health", timeout=5).status_code == 200:
                        return url
            time.sleep(0.2)
        pytest.fail(f"the server did not get ready in {READY_TIMEOUT_S} s:\n{self.log()}")

    def _logged_url(self) -> str | None:
        match = SERVING.search(self.log_path.read_text())
        return match[1] if match else None

    def log(self) -> str:
        return self.log_path.read_text()[-5000:]

    def stop(self) -> int:
        """SIGTERM, then its exit status (SIGKILL to the tree after 60 s)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.stop_tree(grace_s=0)
            raise

    def metrics(self) -> dict[str, float]:
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


@contextlib.contextmanager
def running_server(run_dir: Path, *overrides: str, launcher: tuple[str, ...] = (sys.executable,)
                   ) -> Iterator[ServerProcess]:
    """A server for a test module; after it, it must shut down cleanly on SIGTERM."""
    with ServerProcess(run_dir, *overrides, launcher=launcher) as server:
        yield server
        returncode = server.stop()
        assert returncode == 0, server.log()
        assert "Chitu service stopped" in server.log()
