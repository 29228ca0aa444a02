"""API keys from the command line, a file and the environment, against a real server: with
serve.require_api_key the API and /metrics need a listed key, /health does not, and no key is ever
written to the run's outputs or its log."""
from __future__ import annotations

import pytest
import requests

from test_serve import running_server

CLI_KEY, FILE_KEY, ENV_KEY = "cli-key-5b8e", "file-key-0c41", "env-key-9d27"


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("auth")
    keys_file = run_dir.parent / "keys.txt"
    keys_file.write_text(f"# our keys\n{FILE_KEY} 3\n\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHITU_API_KEYS", f"{ENV_KEY}:2")
        with running_server(run_dir, "infer.max_seq_len=128", "infer.max_reqs=2", "serve.require_api_key=true",
                            f"serve.api_keys_file={keys_file}", f"serve.api_keys=[{{key: {CLI_KEY}, priority: 1}}]") as s:
            yield s
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files and all(key not in p.read_text(errors="replace") for p in files for key in (CLI_KEY, FILE_KEY, ENV_KEY))


def get(server, path: str, key: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(f"{server.url}{path}", headers=headers, timeout=30)


@pytest.mark.parametrize("path", ["/v1/models", "/metrics"])
def test_keys_are_required(server, path):
    assert get(server, path).status_code == 401
    assert get(server, path, "wrong-key").json()["error"]["code"] == "invalid_api_key"
    for key in (CLI_KEY, FILE_KEY, ENV_KEY):
        assert get(server, path, key).status_code == 200


def test_health_needs_no_key(server):
    assert get(server, "/health").json() == {"status": "ok"}


def test_a_listed_key_generates(server):
    response = requests.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {FILE_KEY}"},
                             json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
