"""The launcher without training: what command line and environment each rank gets, the variables of
srun and mpirun, refused launchers and hostfiles, and what DeepSpeed's runner sends to other machines."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conftest import assert_user_error, gpt_env, run_gpt, worker_port
from gptcli.train.launching import launch
from launchers import open_mpi_process, srun_task

PROJECT = """\
[project]
out_dir = "{out}"
[data]
dir = "{out}/data"
[model]
preset = "nano"
"""


@pytest.fixture
def project(tmp_path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(PROJECT.format(out=tmp_path / "run"))
    return path


def train_value_options() -> list[str]:
    from gptcli.cli import app

    command = typer.main.get_command(app).commands["train"]
    return [name for param in command.params if not getattr(param, "is_flag", True) for name in param.opts]


# --- the ranks' command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["train", "--nproc", "2", "--project", "p.toml"], ["train", "--project", "p.toml"]),
    (["train", "--nproc=2", "-p", "p.toml", "--resume", "required"], ["train", "-p", "p.toml", "--resume", "required"]),
    (["train", "--hostfile", "hosts", "--master-port=2950", "--overfit-batch"], ["train", "--overfit-batch"]),
    (["train", "--hostfile=hosts", "--master-port", "2950", "--set", "train.lr=1e-3"], ["train", "--set", "train.lr=1e-3"]),
    # A value that reads like a launcher option stays with the option that takes it.
    (["train", "--set", "--nproc", "--nproc", "4"], ["train", "--set", "--nproc"]),
    # An option the launcher has never heard of is passed on as it is.
    (["train", "--some-new-flag", "--nproc", "2", "--set=a.b=c"], ["train", "--some-new-flag", "--set=a.b=c"]),
])
def test_ranks_run_the_users_command_line_minus_the_launcher_options(argv, expected):
    assert launch.rank_argv(argv, train_value_options()) == expected


def test_gpt_train_nproc_hands_the_launcher_its_own_argv_less_nproc(monkeypatch, project):
    """Every train option reaches the ranks: the launcher gets sys.argv less --nproc/--hostfile/--master-port."""
    from gptcli.cli import app

    calls = []
    monkeypatch.setattr(launch, "launch", lambda argv, nproc, hostfile, port: calls.append((argv, nproc, port)) or 0)
    monkeypatch.delenv("RANK", raising=False)
    args = ["train", "--project", str(project), "--set", "train.lr=1e-3", "--nproc", "2", "--resume", "never",
            "--overfit-batch", "--master-port=4321"]
    monkeypatch.setattr(sys, "argv", ["gpt", *args])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == [(["train", "--project", str(project), "--set", "train.lr=1e-3", "--resume", "never",
                       "--overfit-batch"], 2, 4321)]


# --- what the elastic launcher starts --------------------------------------------------------------------

DUMP_RANK = """
import json, os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS", "GPTCLI_LAUNCHER_PID", "TIKTOKEN_CACHE_DIR")
record = {"argv": sys.argv[1:], "executable": sys.executable, "parent": os.getppid(),
          "env": {k: os.environ.get(k) for k in keys}}
open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".json"), "w").write(json.dumps(record))
"""

LAUNCH_PROBE = """
import sys
from gptcli.train.launching.launch import launch_local
sys.exit(launch_local([sys.executable, "-c", sys.argv[1], sys.argv[2], "--resume", "required"], 2, None))
"""


def launch_probe(tmp_path, env=None) -> tuple[subprocess.Popen, list[dict]]:
    process = subprocess.run([sys.executable, "-c", LAUNCH_PROBE, DUMP_RANK, str(tmp_path)], env=gpt_env(env),
                             capture_output=True, text=True, timeout=120)
    return process, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2) if (tmp_path / f"rank{r}.json").is_file()]


@pytest.mark.slow
def test_two_local_ranks_get_their_ranks_the_visible_gpus_and_this_interpreter(tmp_path):
    """CUDA_VISIBLE_DEVICES=6,7 --nproc 2: LOCAL_RANK 0 and 1 of the GPUs 6,7 (torch numbers the visible ones
    from 0), a free rendezvous port shared by both, the launcher's interpreter, the environment passed on."""
    process, ranks = launch_probe(tmp_path, {"CUDA_VISIBLE_DEVICES": "6,7", "TIKTOKEN_CACHE_DIR": "/cache/tiktoken"})
    assert process.returncode == 0, process.stderr
    assert [r["env"]["RANK"] for r in ranks] == ["0", "1"]
    assert [r["env"]["LOCAL_RANK"] for r in ranks] == ["0", "1"]
    for rank in ranks:
        env = rank["env"]
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert env["CUDA_VISIBLE_DEVICES"] == "6,7"
        assert env["TIKTOKEN_CACHE_DIR"] == "/cache/tiktoken"
        assert env["MASTER_ADDR"] in ("127.0.0.1", "localhost")
        assert env["MASTER_PORT"] == ranks[0]["env"]["MASTER_PORT"] != "29500"
        assert int(env["OMP_NUM_THREADS"]) == max(1, (os.cpu_count() or 1) // 2)
        assert rank["executable"] == sys.executable
        assert rank["argv"] == [str(tmp_path), "--resume", "required"]
        assert env["GPTCLI_LAUNCHER_PID"] == str(rank["parent"])  # the launcher itself, watched by the rank


@pytest.mark.slow
def test_a_failing_rank_fails_the_launch_with_its_code(tmp_path):
    failing = DUMP_RANK + "\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n"
    process = subprocess.run([sys.executable, "-c", LAUNCH_PROBE, failing, str(tmp_path)], env=gpt_env(),
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 3
    assert "Training failed: rank 1 exited with code 3" in process.stderr
    assert "Traceback" not in process.stderr


@pytest.mark.slow
def test_master_port_is_the_users_when_given(tmp_path):
    port = worker_port()
    process, ranks = launch_probe(tmp_path, {"MASTER_PORT": str(port)})
    assert process.returncode == 0, process.stderr
    assert {r["env"]["MASTER_PORT"] for r in ranks} == {str(port)}


@pytest.mark.slow
def test_a_busy_master_port_is_one_sentence(project):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_gpt("train", "--project", project, "--nproc", "2", "--master-port", str(port))
    assert result.returncode == 1
    assert_user_error(result, f"Port {port} is in use", "--master-port")


# --- srun, mpirun and launchers that are not known --------------------------------------------------------


def test_srun_tasks_become_ranks_with_the_first_node_as_master():
    environs = [srun_task(0), srun_task(1)]
    assert [launch.adopt_cluster_ranks(environ) for environ in environs] == ["srun", "srun"]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in environs] == [("0", "0", "2"), ("1", "1", "2")]
    assert {e["MASTER_ADDR"] for e in environs} == {"gpu07"}
    assert len({e["MASTER_PORT"] for e in environs}) == 1


def test_srun_master_port_and_address_set_by_the_user_win():
    environ = srun_task(1, MASTER_ADDR="10.0.0.5", MASTER_PORT="23456")
    launch.adopt_cluster_ranks(environ)
    assert (environ["RANK"], environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("1", "10.0.0.5", "23456")


def test_srun_with_one_gpu_per_task_uses_the_tasks_own_gpu():
    environ = srun_task(1, CUDA_VISIBLE_DEVICES="5")  # srun --gpus-per-task=1: task 1 of the node sees GPU 5 only
    launch.adopt_cluster_ranks(environ)
    assert (environ["RANK"], environ["LOCAL_RANK"]) == ("1", "0")
    environ = srun_task(1, CUDA_VISIBLE_DEVICES="0,1,2,3")  # all of the node's GPUs: the task's own index
    launch.adopt_cluster_ranks(environ)
    assert environ["LOCAL_RANK"] == "1"


@pytest.mark.parametrize("nodelist, first", [
    ("node[01-04]", "node01"), ("node07", "node07"), ("a1,b2", "a1"), ("gpu[3,5-6]-ib,cpu1", "gpu3-ib"),
    ("rack[2-3]n[010-012]", "rack2n010"), ("n[9]", "n9"),
])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert launch.first_host(nodelist) == first


def test_a_batch_script_is_one_process_not_rank_0_of_the_allocation():
    """sbatch's script sees SLURM_PROCID=0 and SLURM_NTASKS=4 but is one process (no job step): it may run
    `gpt train --nproc 4` itself."""
    environ = {k: v for k, v in srun_task(0, ntasks=4).items() if not k.startswith("SLURM_STEP")}
    assert launch.adopt_cluster_ranks(environ) is None
    assert "RANK" not in environ


def test_mpirun_processes_become_ranks_on_one_machine():
    environs = [open_mpi_process(0), open_mpi_process(1)]
    assert [launch.adopt_cluster_ranks(environ) for environ in environs] == ["mpirun", "mpirun"]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["MASTER_ADDR"]) for e in environs] == [
        ("0", "0", "2", "127.0.0.1"), ("1", "1", "2", "127.0.0.1")]
    assert environs[0]["MASTER_PORT"] == environs[1]["MASTER_PORT"]


def test_mpirun_across_machines_needs_master_addr():
    with pytest.raises(launch.GptError, match="MASTER_ADDR"):
        launch.adopt_cluster_ranks(open_mpi_process(2, size=4, local_size=2))
    environ = open_mpi_process(2, size=4, local_size=2, MASTER_ADDR="node1")
    launch.adopt_cluster_ranks(environ)
    assert (environ["RANK"], environ["LOCAL_RANK"], environ["MASTER_ADDR"]) == ("2", "0", "node1")


def test_single_tasks_and_torchrun_ranks_are_left_alone():
    for environ in (srun_task(0, ntasks=1), open_mpi_process(0, size=1, local_size=1),
                    {"RANK": "1", "WORLD_SIZE": "2", "PMI_SIZE": "2", **srun_task(0)}):
        before = dict(environ)
        assert launch.adopt_cluster_ranks(environ) is None
        assert environ == before


@pytest.mark.parametrize("variables", [{"PMI_RANK": "1", "PMI_SIZE": "2"}, {"PMIX_RANK": "0"},
                                       {"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "4"}, {"WORLD_SIZE": "2"}])
def test_ranks_of_a_launcher_that_is_not_known_are_refused(variables):
    with pytest.raises(launch.GptError, match="cannot tell apart"):
        launch.adopt_cluster_ranks(dict(variables))


def test_two_processes_of_an_unknown_launcher_both_refuse_to_train(project):
    """N copies that would each believe they are the only rank, writing one run dir: each says why, exit 1."""
    processes = [subprocess.Popen([sys.executable, "-m", "gptcli", "train", "--project", str(project)],
                                  env=gpt_env({"PMI_RANK": str(rank), "PMI_SIZE": "2"}), stderr=subprocess.PIPE, text=True)
                 for rank in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 1
        assert "Traceback" not in stderr
        assert "MPICH or Intel MPI launcher (PMI_SIZE=2)" in " ".join(stderr.split())
    assert not (project.parent / "run").exists()


def test_nproc_inside_a_launched_rank_is_refused(project):
    result = run_gpt("train", "--project", project, "--nproc", "2", env={"RANK": "0", "WORLD_SIZE": "2"})
    assert_user_error(result, "already rank 0 of 2", "drop --nproc/--hostfile")


# --- hostfiles --------------------------------------------------------------------------------------------


@pytest.mark.slow  # starts `gpt` (or Python) in processes of its own: seconds each
def test_a_missing_hostfile_is_refused_in_one_sentence(project, tmp_path):
    result = run_gpt("train", "--project", project, "--hostfile", tmp_path / "hosts.txt")
    assert result.returncode == 1
    assert_user_error(result, f"The hostfile {tmp_path / 'hosts.txt'} does not exist")
    assert not (tmp_path / "run").exists()


def fake_tool(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.slow
def test_hostfile_runs_deepspeeds_runner_and_sends_the_ranks_variables_to_every_node(project, tmp_path):
    """With a hostfile of two machines DeepSpeed's runner builds one pdsh command whose `export` prefix is all
    the remote ranks get; ssh and pdsh are stand-ins here that record what they were asked to run."""
    tools = tmp_path / "bin"
    tools.mkdir()
    fake_tool(tools, "ssh", "echo 10.1.2.3\n")
    fake_tool(tools, "pdsh", f'printf "%s\\n" "$@" > {tmp_path / "pdsh-args"}\n')
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    env = {"PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "TIKTOKEN_CACHE_DIR": "/shared/tiktoken",
           "HF_HOME": "/shared/hf", "HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": "/shared/ext",
           "GPTCLI_FAULT": "nan@99", "UNRELATED_SECRET": "x", "DS_ENV_FILE": ".deepspeed_env"}
    (tmp_path / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=ib0\n")  # the user's own file still counts
    result = run_gpt("train", "--project", project, "--hostfile", hostfile, "--set", "train.lr=1e-3",
                     "--master-port", "29600", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = " ".join((tmp_path / "pdsh-args").read_text().split("\n"))
    for export in ("TIKTOKEN_CACHE_DIR=/shared/tiktoken", "HF_HOME=/shared/hf", "HF_HUB_OFFLINE=1",
                   "TORCH_EXTENSIONS_DIR=/shared/ext", "GPTCLI_FAULT=nan@99", "NCCL_SOCKET_IFNAME=ib0"):
        assert f"export {export};" in remote
    assert "UNRELATED_SECRET" not in remote
    assert "node1,node2" in remote
    assert f"{sys.executable} -u -m deepspeed.launcher.launch" in remote
    assert "--master_port=29600" in remote
    assert " --module " in remote and " --no_local_rank " in remote  # `python -m gptcli`, LOCAL_RANK from the env
    assert remote.rstrip().endswith(f" gptcli train --project {project} --set train.lr=1e-3")
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("gptcli-deepspeed-env-*"))


@pytest.mark.parametrize("content, fragment", [
    ("", "lists no machine; a hostfile lists one machine per line as `hostname slots=N`"),
    ("# only a comment\n\n", "lists no machine"),
    ("node1 slots=2\nthis is not a host line\n", "Line 2 of the hostfile"),
    ("node1 slots=0\n", "Line 1 of the hostfile"),
    ("node1 slots=2\nnode1 slots=2\n", "lists node1 twice (line 2)"),
])
def test_a_hostfile_that_is_empty_or_garbage_is_one_sentence(tmp_path, content, fragment):
    """DeepSpeed's runner answered these with its traceback; they never reach it now."""
    from gptcli.errors import GptError

    (tmp_path / "hosts").write_text(content)
    with pytest.raises(GptError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        launch.read_hostfile(tmp_path / "hosts")


@pytest.mark.slow  # starts `gpt` (or Python) in processes of its own: seconds each
def test_an_unreachable_host_is_one_sentence_before_deepspeeds_runner(project, tmp_path):
    tools = tmp_path / "bin"
    tools.mkdir()
    fake_tool(tools, "ssh", 'echo "ssh: connect to host node9 port 22: No route to host" >&2\nexit 255\n')
    (tmp_path / "hosts").write_text("node9 slots=1\n")
    result = run_gpt("train", "--project", project, "--hostfile", tmp_path / "hosts",
                     env={"PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"})
    assert_user_error(result, "Cannot reach host node9 of the hostfile", "No route to host",
                      "set up passwordless ssh to every host")
    assert "Traceback" not in result.stderr and "deepspeed" not in result.stderr.lower()
    assert not (tmp_path / "run").exists()


def test_a_rank_whose_peer_died_leaves_quietly_for_the_launcher_to_report():
    """kill -9 of rank 1: rank 0 printed "internal error: RuntimeError: [...gloo...] Connection closed by
    peer" (or "stopped by SIGTERM") before the launcher's sentence. Now only the launcher speaks."""
    import signal

    from gptcli.errors import GptError, Stopped

    ours = {launch.LAUNCHER_PID_VARIABLE: "123", "WORLD_SIZE": "2"}
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1")
    assert launch.quiet_exit_code(gloo, ours) == 1
    assert launch.quiet_exit_code(Stopped(signal.SIGTERM), ours) == 143
    assert launch.quiet_exit_code(KeyboardInterrupt(), ours) == 130
    assert launch.quiet_exit_code(GptError("train.lr must be more than 0"), ours) is None  # a user error still speaks
    assert launch.quiet_exit_code(ValueError("a bug"), ours) is None  # a bug still speaks
    assert launch.quiet_exit_code(gloo, {"WORLD_SIZE": "2"}) is None  # no launcher to report it: say it
    assert launch.quiet_exit_code(gloo, {**ours, "WORLD_SIZE": "1"}) is None


def test_the_launcher_reports_the_rank_that_failed_first_once():
    from types import SimpleNamespace

    failures = {0: SimpleNamespace(exitcode=-15, timestamp=20), 1: SimpleNamespace(exitcode=-9, timestamp=10)}
    report = launch.failure_report(failures)
    assert report == ("Training failed: rank 1 exited with code 137 (killed by SIGKILL); rank 0 stopped with it; "
                      "no rank is left running.")
