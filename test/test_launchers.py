"""The multi-node launchers in script/: dry runs, usage errors, and real runs over a fake ssh (and docker)."""

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import process_tree
from process_tree import ProcessTree, unused_port

REPO = Path(__file__).resolve().parent.parent
SRUN = REPO / "script" / "srun_multi_node.sh"
SSH = REPO / "script" / "ssh_multi_node.sh"
SSH_DOCKER = REPO / "script" / "ssh_docker_multi_node.sh"

COMMAND = ["test/single_req_test.py", "models=X", "request.prompt=a b", "infer.tp_size=2"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything a launcher would forward or read, plus `extra`."""
    prefixes = ("NCCL_", "GLOO_", "TP_SOCKET_", "CHITU_", "SLURM_")
    drop = {"LD_LIBRARY_PATH", "VIRTUAL_ENV", "PYTHONPATH", "CUDA_VISIBLE_DEVICES", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(prefixes)}
    env.update(extra)
    return env


def launch(script: Path, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return process_tree.run([str(script), *args], cwd=REPO, env=env, timeout=timeout)


def dry_run(script: Path, *args: str, **extra: str) -> list[str]:
    result = launch(script, *args, env=clean_env(CHITU_DRY_RUN="1", **extra))
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def node_line(line: str, rank: int, host: str) -> list[str]:
    prefix = f"node {rank} ({host}): "
    assert line.startswith(prefix), line
    return shlex.split(line[len(prefix) :])


def torchrun_args(nnodes: int, gpus: int, rank: int, master: str, port: int | str) -> list[str]:
    return ["torchrun", "--nnodes", str(nnodes), "--nproc_per_node", str(gpus), "--node_rank", str(rank),
            "--master_addr", master, "--master_port", str(port)]  # fmt: skip


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """`env A=1 B=2 cmd...` -> ({A: 1, B: 2}, cmd...)."""
    assert words[0] == "env", words
    i = 1
    while "=" in words[i] and not words[i].startswith("-"):
        i += 1
    return dict(w.split("=", 1) for w in words[1:i]), words[i:]


# ---- dry runs ----


def test_ssh_dry_run():
    lines = dry_run(SSH, "host1, host2", "2", *COMMAND, MASTER_PORT="52345", NCCL_DEBUG="INFO",
                    GLOO_SOCKET_IFNAME="lo", CHITU_FOO="x y", PYTHONPATH="/p")  # fmt: skip
    assert len(lines) == 2
    for rank, host in enumerate(["host1", "host2"]):
        ssh, n, target, remote = node_line(lines[rank], rank, host)
        assert (ssh, n, target) == ("ssh", "-n", host)
        words = shlex.split(remote)
        assert words[:3] == ["cd", str(REPO), "&&"]
        env, cmd = split_env(words[3:])
        assert env["NCCL_DEBUG"] == "INFO" and env["GLOO_SOCKET_IFNAME"] == "lo" and env["CHITU_FOO"] == "x y"
        assert env["PYTHONPATH"] == "/p" and env["PATH"] == os.environ["PATH"]
        assert "CHITU_DRY_RUN" not in env and "MASTER_PORT" not in env
        assert cmd == torchrun_args(2, 2, rank, "host1", 52345) + COMMAND


def test_ssh_default_port():
    lines = dry_run(SSH, "a,b,c", "8", "-m", "chitu", "serve.port=21002")
    assert len(lines) == 3
    for rank, host in enumerate("abc"):
        _, cmd = split_env(shlex.split(node_line(lines[rank], rank, host)[3])[3:])
        assert cmd == torchrun_args(3, 8, rank, "a", 52000) + ["-m", "chitu", "serve.port=21002"]


def test_ssh_docker_dry_run():
    lines = dry_run(SSH_DOCKER, "my container", "/work space", "host1,host2", "2", *COMMAND,
                    NCCL_DEBUG="INFO", PYTHONPATH="/host/only")  # fmt: skip
    assert len(lines) == 2
    for rank, host in enumerate(["host1", "host2"]):
        ssh, n, target, remote = node_line(lines[rank], rank, host)
        assert (ssh, n, target) == ("ssh", "-n", host)
        docker = shlex.split(remote)
        assert docker[:6] == ["docker", "exec", "-t", "my container", "bash", "--login"]
        assert docker[6] == "-c" and len(docker) == 8
        inner = shlex.split(docker[7])
        assert inner[:3] == ["cd", "/work space", "&&"]
        env, cmd = split_env(inner[3:])
        assert env == {"NCCL_DEBUG": "INFO"}  # host paths are not forced into the container
        assert cmd == torchrun_args(2, 2, rank, "host1", 52000) + COMMAND


def test_srun_dry_run_outside_slurm():
    lines = dry_run(SRUN, "2", "4", *COMMAND)
    assert shlex.split(lines[0]) == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--gres=gpu:4",
                                     "--cpus-per-task", "96", str(SRUN), "2", "4", *COMMAND]  # fmt: skip
    assert len(lines) == 3
    for rank in range(2):
        line = lines[1 + rank]
        assert line.startswith(f"node {rank} (<node{rank}>): ")
        assert "--master_addr <node0> --master_port <52000+SLURM_JOB_ID%10000>" in line
        assert f"--node_rank {rank} " in line


def test_srun_dry_run_in_allocation():
    lines = dry_run(SRUN, "2", "2", *COMMAND, SLURM_JOB_NODELIST="gpu1,gpu2", SLURM_JOB_ID="123456")
    assert shlex.split(lines[0])[:8] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--gres=gpu:2",
                                         "--cpus-per-task", "48"]  # fmt: skip
    for rank, host in enumerate(["gpu1", "gpu2"]):
        env, cmd = split_env(node_line(lines[1 + rank], rank, host))
        assert env == {"NCCL_GRAPH_MIXING_SUPPORT": "0", "NCCL_GRAPH_REGISTER": "0"}
        assert cmd == torchrun_args(2, 2, rank, "gpu1", 52000 + 123456 % 10000) + COMMAND


def test_srun_dry_run_scontrol(tmp_path: Path):
    """With scontrol on PATH, the node names come from `scontrol show hostnames`."""
    script = '#!/usr/bin/env bash\n[[ "$*" == "show hostnames gpu[1-2]" ]] && printf "gpu1\\ngpu2\\n"\n'
    (tmp_path / "scontrol").write_text(script)
    (tmp_path / "scontrol").chmod(0o755)
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    lines = dry_run(SRUN, "2", "1", "x.py", SLURM_JOB_NODELIST="gpu[1-2]", SLURM_JOB_ID="3", PATH=path)
    for rank, host in enumerate(["gpu1", "gpu2"]):
        _, cmd = split_env(node_line(lines[1 + rank], rank, host))
        assert cmd == torchrun_args(2, 1, rank, "gpu1", 52003) + ["x.py"]


def test_srun_dry_run_inside_step():
    slurm = dict(SLURM_PROCID="1", SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu1,gpu2", SLURM_JOB_ID="7")
    lines = dry_run(SRUN, "2", "2", *COMMAND, **slurm, MASTER_PORT="40000")
    assert len(lines) == 1
    env, cmd = split_env(node_line(lines[0], 1, "gpu2"))
    assert cmd == torchrun_args(2, 2, 1, "gpu1", 40000) + COMMAND


# ---- usage errors ----


@pytest.mark.parametrize(
    "script,args,message",
    [
        (SRUN, [], "too few arguments"),
        (SRUN, ["2"], "too few arguments"),
        (SRUN, ["two", "2", "x.py"], "num_nodes must be a positive integer"),
        (SRUN, ["2", "0", "x.py"], "gpus_per_node must be a positive integer"),
        (SRUN, ["2", "2"], "missing the command"),
        (SSH, ["h1,h2"], "too few arguments"),
        (SSH, ["", "2", "x.py"], "empty host list"),
        (SSH, [",", "2", "x.py"], "empty host list"),
        (SSH, ["h1,h2", "2x", "x.py"], "gpus_per_node must be a positive integer"),
        (SSH, ["h1,h2", "2"], "missing the command"),
        (SSH_DOCKER, ["c", "/w", "h1"], "too few arguments"),
        (SSH_DOCKER, ["c", "/w", "", "2", "x.py"], "empty host list"),
        (SSH_DOCKER, ["c", "/w", "h1", "-1", "x.py"], "gpus_per_node must be a positive integer"),
        (SSH_DOCKER, ["c", "/w", "h1", "2"], "missing the command"),
    ],
)
def test_usage_errors(script, args, message):
    result = launch(script, *args, env=clean_env(CHITU_DRY_RUN="1"))
    assert result.returncode == 2
    assert message in result.stderr and "usage:" in result.stderr
    assert result.stdout == ""


# ---- real runs over a fake ssh (and docker) ----

WORKER = """
import os, sys
import torch
import torch.distributed as dist

fail_rank = os.environ.get("CHITU_TEST_FAIL_RANK")  # CHITU_* goes through to the nodes
if fail_rank is not None:
    sys.exit(3 if os.environ["RANK"] == fail_rank else 0)
dist.init_process_group("gloo")
t = torch.tensor([dist.get_rank()])
dist.all_reduce(t)
print(f"rank {dist.get_rank()} of {dist.get_world_size()} sum {int(t)}", flush=True)
print(f"rank {dist.get_rank()} NCCL_GRAPH_REGISTER={os.environ.get('NCCL_GRAPH_REGISTER')}", flush=True)
dist.destroy_process_group()
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A directory with `ssh` (logs the host, runs the remote string here) and `docker` (runs the bash -c string)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "ssh").write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        [[ $1 == -n ]] || exit 255
        echo "ssh $2" >>{shlex.quote(str(log))}
        exec bash -c "$3"
        """))  # fmt: skip
    (bin_dir / "docker").write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        [[ "$1 $2 $4 $5 $6" == "exec -t bash --login -c" ]] || exit 125
        echo "docker $3" >>{shlex.quote(str(log))}
        exec bash -c "$7"
        """))  # fmt: skip
    (bin_dir / "srun").write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        # srun --nodes N --ntasks-per-node 1 --gres=gpu:G --cpus-per-task C cmd...: N local tasks, one per "node"
        echo "srun $*" >>{shlex.quote(str(log))}
        nodes=$2
        shift 7
        export SLURM_JOB_ID=1 SLURM_JOB_NODELIST=127.0.0.1,localhost
        for ((i = 0; i < nodes; i++)); do SLURM_PROCID=$i SLURM_NODEID=$i "$@" & done
        rc=0
        for job in $(jobs -p); do wait "$job" || rc=$?; done
        exit $rc
        """))  # fmt: skip
    for tool in ("ssh", "docker", "srun"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def real_env(fake_bin: Path, **extra: str) -> dict[str, str]:
    bin_of_python = str(Path(sys.executable).parent)
    path = os.pathsep.join([str(fake_bin), bin_of_python, os.environ["PATH"]])
    return clean_env(PATH=path, MASTER_PORT=str(unused_port()), GLOO_SOCKET_IFNAME="lo", **extra)


@pytest.mark.parametrize("script,args,call", [
    (SSH, ["127.0.0.1,127.0.0.1", "1", "{worker}"], "ssh 127.0.0.1"),
    (SSH_DOCKER, ["box", "{dir}", "127.0.0.1,127.0.0.1", "1", "worker.py"], "docker box"),
], ids=["ssh", "ssh_docker"])
def test_real_run_over_two_nodes(script: Path, args: list[str], call: str, fake_bin: Path, tmp_path: Path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = [a.format(worker=worker, dir=tmp_path) for a in args]
    result = launch(script, *args, env=real_env(fake_bin), timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0 of 2 sum 1" in result.stdout and "rank 1 of 2 sum 1" in result.stdout
    assert (tmp_path / "calls.log").read_text().split("\n").count(call) == 2


def test_ssh_real_run_failing_node(fake_bin: Path, tmp_path: Path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = real_env(fake_bin, CHITU_TEST_FAIL_RANK="0")
    result = launch(SSH, "localhost,127.0.0.1", "1", str(worker), env=env, timeout=90)
    assert result.returncode != 0
    assert "node 0 (localhost) failed" in result.stderr
    assert "node 1 (127.0.0.1) failed" not in result.stderr


def test_srun_real_run(fake_bin: Path, tmp_path: Path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    result = launch(SRUN, "2", "1", str(worker), env=real_env(fake_bin), timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0 of 2 sum 1" in result.stdout and "rank 1 of 2 sum 1" in result.stdout
    assert "rank 0 NCCL_GRAPH_REGISTER=0" in result.stdout and "rank 1 NCCL_GRAPH_REGISTER=0" in result.stdout
    assert (tmp_path / "calls.log").read_text().startswith("srun --nodes 2 --ntasks-per-node 1 --gres=gpu:1 ")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ssh_interrupt_stops_nodes(fake_bin: Path, tmp_path: Path, sig: int, code: int):
    """Ctrl-C (or SIGTERM) on the launcher kills the ssh jobs (here a fake torchrun that sleeps)."""
    (fake_bin / "torchrun").write_text(f"#!/usr/bin/env bash\necho $$ >{tmp_path}/pid.$6\nexec sleep 60\n")
    (fake_bin / "torchrun").chmod(0o755)
    with ProcessTree([str(SSH), "a,b", "1", "x.py"], cwd=REPO, env=real_env(fake_bin), text=True,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:  # fmt: skip
        pid_files = [tmp_path / "pid.0", tmp_path / "pid.1"]
        deadline = time.monotonic() + 20
        while not all(f.exists() and f.read_text().strip() for f in pid_files):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        pids = [int(f.read_text()) for f in pid_files]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == code and "stopping the ssh jobs" in err
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
