"""The NVIDIA image's Dockerfile, as far as a machine without a Docker daemon can check it: it parses with
Docker's own parser, installs the way the README does, and its default command is a valid Chitu service command
listening on the port it exposes."""
from pathlib import Path

import dockerfile

from chitu.config import compose_config

REPO = Path(__file__).resolve().parent.parent


def instructions() -> dict[str, list[tuple[str, ...]]]:
    by_command: dict[str, list[tuple[str, ...]]] = {}
    for instruction in dockerfile.parse_file(str(REPO / "Dockerfile")):
        by_command.setdefault(instruction.cmd.upper(), []).append(instruction.value)
    return by_command


def test_the_image_builds_on_a_cuda_devel_pytorch_image_with_the_readme_install():
    steps = instructions()
    base = dict(arg.split("=", 1) for (arg,) in steps["ARG"] if "=" in arg)["BASE_IMAGE"]
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and base.endswith("-devel")
    assert steps["FROM"] == [("${BASE_IMAGE}",)]
    assert steps["COPY"] == [(".", ".")]
    [(run,)] = steps["RUN"]
    assert run.startswith("bash script/install.sh") and (REPO / "script" / "install.sh").is_file()
    assert steps["SHELL"] == [("/bin/bash", "-c")]  # the extras' torch pin reads a process substitution


def test_the_default_command_serves_on_the_exposed_port():
    steps = instructions()
    [command] = steps["CMD"]
    assert command[:3] == ("python", "-m", "chitu")
    overrides = list(command[3:])
    config = compose_config(overrides)  # every key is one the schema knows
    assert config.serve.host == "0.0.0.0"
    assert steps["EXPOSE"] == [(str(config.serve.port),)]


def test_the_build_context_leaves_out_the_git_history_and_build_outputs():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", "build", "dist", "outputs"} <= set(ignored)
