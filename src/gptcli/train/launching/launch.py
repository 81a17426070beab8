"""Starting the ranks of a run, and recognising ranks that a cluster's launcher started.

`gpt train --nproc N` starts N ranks on this machine through torch's elastic launcher (the code behind
`torchrun`), run inside this process under the same interpreter, the same way with or without CUDA.
`gpt train --hostfile H` hands the ranks to DeepSpeed's runner, which reaches other machines over ssh.
Either way each rank runs the user's own command line minus the launcher's options, so every `gpt train`
option reaches the ranks without a list of them being kept here.

A process that srun or mpirun (Open MPI) started learns its rank from their variables; a process that
looks like one of several started by a launcher gptcli does not know is refused rather than left to
believe it is the only rank.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, MutableMapping, Optional

from ...errors import GptError
from ...parsing import is_whole_number
from ...paths import MIB, read_input_text

# Options that choose how ranks are started; the ranks themselves must not see them.
LAUNCHER_OPTIONS = ("--nproc", "--hostfile", "--master-port")

# How long ranks get to finish their step and save after a SIGTERM/SIGINT before they are killed. Cluster
# managers bound this themselves (Kubernetes' grace period, SLURM's KillWait) by killing the launcher, and
# the ranks die with it; this bound is for a rank stuck in a collective.
SHUTDOWN_SECONDS = 300

# Set in each rank this launcher starts: the launcher's pid, which the rank watches (see die_with_launcher).
LAUNCHER_PID_VARIABLE = "GPTCLI_LAUNCHER_PID"

# What every rank reads from its environment besides the launcher's own variables: the tokenizer cache,
# Hugging Face's settings, DeepSpeed's compiled ops, the accelerator choice and gptcli's own switches.
FORWARDED_VARIABLES = ("TIKTOKEN_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR")
FORWARDED_PREFIXES = ("HF_", "GPTCLI_", "TIKTOKEN_")


def rank_argv(argv: list[str], value_options: Iterable[str]) -> list[str]:
    """The launcher's command line without LAUNCHER_OPTIONS (as `--nproc 2` or `--nproc=2`).

    `value_options` names the options that take a value, so that a value which happens to read like a
    launcher option (`--set --nproc`) is kept with its option."""
    takes_value, kept, index = set(value_options), [], 0
    while index < len(argv):
        token = argv[index]
        if token == "--":
            kept.extend(argv[index:])
            break
        name = token.split("=", 1)[0]
        if name in LAUNCHER_OPTIONS:
            index += 1 if "=" in token else 2
            continue
        kept.append(token)
        if token in takes_value and index + 1 < len(argv):
            kept.append(argv[index + 1])
            index += 1
        index += 1
    return kept


def launch(argv: list[str], nproc: int, hostfile: Optional[Path], master_port: Optional[int]) -> int:
    """Run `gpt ARGV` (ARGV starts with `train`) on `nproc` local ranks, or on the hosts of `hostfile`;
    returns the exit code for the launcher (128 + N after signal N, the failed rank's code otherwise)."""
    command = [sys.executable, "-m", "gptcli", *argv]
    if hostfile is not None:
        return launch_hosts(command[1:], hostfile, master_port)
    return launch_local(command, nproc, master_port)


# --- one machine: torch's elastic launcher ---------------------------------------------------------------


def launch_local(command: list[str], nproc: int, master_port: Optional[int]) -> int:
    """`command` on `nproc` ranks of this machine through torch.distributed's elastic agent.

    The agent gives every rank RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (its own store on a
    free port unless one is given), passes the rest of the environment through (CUDA_VISIBLE_DEVICES too:
    LOCAL_RANK i uses the i-th visible GPU), forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to every rank and
    waits for them, and stops the others when one fails."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from .stopping import end_launch_on_signal

    os.environ.update(rank_environment(nproc, os.environ))
    config = local_launch_config(nproc, master_port if master_port is not None else env_port(os.environ))
    quiet_elastic_logs()
    try:
        end_launch_on_signal()  # until the agent installs its own handlers
        with failures_marked():
            elastic_launch(config, command[0])(*command[1:])
    except SignalException as stop:
        print(f"Stopped by {stop.sigval.name}: it was passed to every rank, to finish its step and save (ranks "
              f"still running {SHUTDOWN_SECONDS} s later, or after a second signal, were killed).", file=sys.stderr)
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        print(failure_report(failed.failures), file=sys.stderr)
        return exit_code_of(failed.get_first_failure()[1].exitcode) or 1
    except Exception as error:  # the rendezvous store could not start: a busy port, no loopback
        if "EADDRINUSE" in str(error):
            raise GptError(f"Port {master_port or env_port(os.environ)} is in use; give another with --master-port "
                           "(or MASTER_PORT), or neither for a free one.") from None
        raise GptError(f"Could not start {nproc} ranks: {type(error).__name__}: {error}") from None
    return 0


def rank_environment(nproc: int, environ: Mapping[str, str]) -> dict[str, str]:
    """What this launcher adds to the environment of its ranks: its pid, and an equal share of the CPU
    cores for each rank's intra-op threads unless OMP_NUM_THREADS is set."""
    added = {LAUNCHER_PID_VARIABLE: str(os.getpid())}
    if "OMP_NUM_THREADS" not in environ:
        added["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return added


def local_launch_config(nproc: int, master_port: Optional[int]):
    """One node, no restarts, output straight to this terminal. Without a port, torchrun's standalone mode
    (a c10d rendezvous whose store gives the ranks a free port); with one, the static rendezvous, whose store
    on that port the ranks share (as `torchrun --master-port P`)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    backend, options = ("static", {"rank": 0}) if master_port else ("c10d", {})
    return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                        rdzv_backend=backend, rdzv_endpoint=f"127.0.0.1:{master_port or 0}", rdzv_configs=options,
                        max_restarts=0, logs_specs=DefaultLogsSpecs(log_dir=os.devnull),
                        shutdown_timeout=SHUTDOWN_SECONDS)


def env_port(environ: Mapping[str, str]) -> Optional[int]:
    value = environ.get("MASTER_PORT")
    if value is None:
        return None
    if not is_whole_number(value) or not 0 < int(value) < 65536:
        raise GptError(f"MASTER_PORT={shown_value(value)} is not a port number (1-65535); set a free port, or unset "
                       "it for a free one.")
    return int(value)


def quiet_elastic_logs() -> None:
    """The agent logs each step of a shutdown as a warning; launch_local says what happened in one line."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.launcher"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


@contextmanager
def failures_marked() -> Iterator[None]:
    """While torch's agent runs the ranks: a file is created when it ends the survivors of a failed rank,
    before they get their SIGTERM, and the ranks know that file's name (stopping.PEER_FAILED_VARIABLE). So
    a survivor's SIGTERM is known for what it is and not answered with "stopping after this step; saving a
    checkpoint" (no rank can save with a peer gone): the launcher reports the failure, once.

    torch ends the ranks through PContext.close: with no signal named when its poll found a rank failed
    (or all of them done), with the signal itself when the launcher was signalled (then the ranks do save)."""
    from torch.distributed.elastic.multiprocessing.api import PContext

    from .stopping import PEER_FAILED_VARIABLE

    directory = Path(tempfile.mkdtemp(prefix="gptcli-launch-"))
    marker = directory / "a-rank-failed"
    original = PContext.close

    def close(self, death_sig=None, *args, **kwargs):
        if death_sig is None:
            marker.touch()
        return original(self, death_sig, *args, **kwargs)

    PContext.close = close  # type: ignore[method-assign]  # torch's agent, patched while the ranks run
    os.environ[PEER_FAILED_VARIABLE] = str(marker)  # the ranks the agent starts inherit it
    try:
        yield
    finally:
        PContext.close = original  # type: ignore[method-assign]  # torch's own method back
        os.environ.pop(PEER_FAILED_VARIABLE, None)
        shutil.rmtree(directory, ignore_errors=True)


def failure_report(failures: dict) -> str:
    """One sentence: the rank that failed first (the cause: the launcher then stopped the others, which
    stay quiet, see `quiet_exit_code`), and that the others stopped with it."""
    codes = {rank: exit_code_of(failure.exitcode) for rank, failure in failures.items()}
    if len(failures) > 1 and len(set(codes.values())) == 1 and next(iter(codes.values())) in (130, 143):
        code = next(iter(codes.values()))  # a signal sent to the ranks
        return f"Every rank stopped on {signal.Signals(code - 128).name} after saving its step."
    order = sorted(failures, key=lambda rank: getattr(failures[rank], "timestamp", 0))
    first = order[0]
    others = f"; rank {', '.join(map(str, order[1:]))} stopped with it" if len(order) > 1 else ""
    return (f"Training failed: rank {first} exited with code {codes[first]}{signal_note(codes[first])}{others}; "
            "no rank is left running.")


def quiet_exit_code(error: BaseException, environ: Mapping[str, str] = os.environ) -> Optional[int]:
    """The exit code for a rank to leave with silently, when `error` is what a launcher already reports in
    its own sentence: in a rank of several started by `gpt train --nproc` or torchrun, a stop by signal
    (the launcher passed it on, or stopped the survivors of a failed rank), a collective broken because
    another rank died, or (on ranks above 0) an error every rank raised alike, which rank 0 says. None:
    report it as usual."""
    from ...errors import RankAgreedError, Stopped

    launched = LAUNCHER_PID_VARIABLE in environ or "TORCHELASTIC_RUN_ID" in environ
    if not launched or int(environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    if isinstance(error, Stopped):
        return error.exit_code
    if isinstance(error, RankAgreedError):  # rank 0 says it, once
        return None if environ.get("RANK", "0") == "0" else error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return 1 if lost_a_peer(error) else None


# What gloo and NCCL say when the other end of a collective is gone (torch raises DistError subclasses for
# most of it, a plain RuntimeError for some of gloo's).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def lost_a_peer(error: BaseException) -> bool:
    import torch.distributed as dist

    kinds = tuple(kind for kind in (getattr(dist, "DistError", None),) if kind is not None)
    return (bool(kinds) and isinstance(error, kinds)) or (
        isinstance(error, RuntimeError) and any(words in str(error) for words in PEER_LOST))


def exit_code_of(returncode: int) -> int:
    """A child killed by a signal reports -signum; a shell reports that as 128 + signum."""
    return 128 - returncode if returncode < 0 else returncode


def signal_note(code: int) -> str:
    if code <= 128:
        return ""
    try:
        return f" (killed by {signal.Signals(code - 128).name})"
    except ValueError:
        return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- several machines: DeepSpeed's runner -------------------------------------------------------------------


def launch_hosts(module_argv: list[str], hostfile: Path, master_port: Optional[int]) -> int:
    """`python -m deepspeed.launcher.runner --hostfile H ... --module gptcli train ...` under this interpreter.

    The runner passes only a fixed set of variables (and the lines of a `.deepspeed_env` file) to other
    machines, so the variables every rank needs are written to an env file it is pointed at (DS_ENV_FILE)."""
    hosts = read_hostfile(hostfile)
    check_reachable(hosts, hostfile)
    env_file = write_env_file(forwarded_environment(os.environ) | user_deepspeed_env(os.environ))
    try:
        command = hostfile_command(module_argv, hostfile, master_port or env_port(os.environ), os.environ)
        return run_child(command, dict(os.environ, DS_ENV_FILE=str(env_file)))
    finally:
        env_file.unlink(missing_ok=True)


HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")  # DeepSpeed's runner reads `hostname slots=N`
HOSTFILE_LIMIT = MIB  # a line per machine: a million bytes list thousands of them
SSH_SECONDS = 10  # how long reaching one host may take before it counts as unreachable


def read_hostfile(hostfile: Path) -> dict[str, int]:
    """The hosts of a DeepSpeed hostfile and their slots, read as DeepSpeed's runner reads it (comments and
    blank lines skipped), so that a fault is one sentence here instead of the runner's traceback."""
    shape = "a hostfile lists one machine per line as `hostname slots=N`"
    if not hostfile.exists():
        raise GptError(f"The hostfile {hostfile} does not exist; {shape}.")
    lines = read_input_text(hostfile, "The hostfile", HOSTFILE_LIMIT).splitlines()  # never a device or a FIFO
    hosts: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(text)
        if match is None or int(match.group(2)) < 1:
            raise GptError(f"Line {number} of the hostfile {hostfile} ({ascii(text[:60])[1:-1]}) is not "
                           "`hostname slots=N` with N at least 1.")
        if match.group(1) in hosts:
            raise GptError(f"The hostfile {hostfile} lists {match.group(1)} twice (line {number}); list each machine once.")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise GptError(f"The hostfile {hostfile} lists no machine; {shape}.")
    return hosts


def check_reachable(hosts: dict[str, int], hostfile: Path) -> None:
    """DeepSpeed's runner reaches every host over ssh without a password (and through pdsh for several);
    check that before it starts, so that an unknown or unreachable host is one sentence."""
    if len(hosts) > 1 and shutil.which("pdsh") is None:
        raise GptError(f"The hostfile {hostfile} lists {len(hosts)} machines, which DeepSpeed's runner reaches with "
                       "pdsh, and pdsh is not installed here; install it, or train on this machine with --nproc.")
    if shutil.which("ssh") is None:
        raise GptError("ssh is not installed here, and DeepSpeed's runner reaches the hosts of a hostfile with it; "
                       "install an ssh client, or train on this machine with --nproc.")
    for host in hosts:  # ssh, not a name lookup: a host may be an alias of the user's ssh config
        command = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_SECONDS}", host, "true"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=SSH_SECONDS + 5)
            failed, why = result.returncode != 0, (result.stderr.strip().splitlines() or ["no message"])[-1]
        except subprocess.TimeoutExpired:
            failed, why = True, f"no answer within {SSH_SECONDS + 5} s"
        if failed:
            raise GptError(f"Cannot reach host {host} of the hostfile {hostfile} over ssh without a password "
                           f"({why}); set up passwordless ssh to every host, or train on this machine with --nproc.")


def hostfile_command(module_argv: list[str], hostfile: Path, master_port: Optional[int],
                     environ: Mapping[str, str]) -> list[str]:
    """The runner's command line; `module_argv` is `["-m", "gptcli", "train", ...]`."""
    _, module, *user_args = module_argv
    where = ["--hostfile", str(hostfile)]
    if master_port:
        where += ["--master_port", str(master_port)]
    if environ.get("MASTER_ADDR"):
        where += ["--master_addr", environ["MASTER_ADDR"]]
    # --no_local_rank: each rank reads LOCAL_RANK from its environment; the runner takes --module, not -m.
    return [sys.executable, "-u", "-m", "deepspeed.launcher.runner", *where, "--no_local_rank", "--module", module,
            *user_args]


def forwarded_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in environ.items()
            if key in FORWARDED_VARIABLES or key.startswith(FORWARDED_PREFIXES)}


def user_deepspeed_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The `.deepspeed_env` files the runner would read itself (home, then the working directory, or the
    file DS_ENV_FILE names): pointing it at our file replaces them, so their lines are carried over."""
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    values: dict[str, str] = {}
    for directory in (Path.home(), Path(".")):
        path = directory / name
        if path.is_file():
            for line in path.read_text().splitlines():
                key, separator, value = line.partition("=")
                if separator and key.strip():
                    values[key.strip()] = value
    return values


def write_env_file(values: Mapping[str, str]) -> Path:
    descriptor, name = tempfile.mkstemp(prefix="gptcli-deepspeed-env-")
    with os.fdopen(descriptor, "w") as file:
        for key, value in values.items():
            if "\n" not in value:  # the runner reads one KEY=VALUE per line
                file.write(f"{key}={value}\n")
    return Path(name)


def run_child(command: list[str], env: dict[str, str]) -> int:
    """Run a launcher process that dies with this one; SIGTERM/SIGINT are passed on, and after one the exit
    code is 128 + its number (the runner stops the remote ranks its own way)."""
    child = subprocess.Popen(command, env=env, preexec_fn=set_parent_death_signal)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 + received[0] if received else exit_code_of(returncode)


# --- in a rank ------------------------------------------------------------------------------------------------


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where prctl is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_launcher(environ: Mapping[str, str] = os.environ) -> None:
    """A rank of `gpt train --nproc` (or of torchrun) must not outlive its launcher, even after a kill -9
    of it: a rank left alone would train on, or block forever in a collective. The parent-death signal does
    it on Linux (a watchdog thread elsewhere); a launcher already gone by now is caught by its pid."""
    expected = environ.get(LAUNCHER_PID_VARIABLE) or (str(os.getppid()) if "TORCHELASTIC_RUN_ID" in environ else None)
    if expected is None:
        return
    if not set_parent_death_signal():
        watch_parent(int(expected))
    if os.getppid() != int(expected):
        os._exit(128 + signal.SIGKILL)


def watch_parent(parent: int, interval: float = 1.0) -> None:
    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(128 + signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()


# --- the environment: read once, before DeepSpeed ---------------------------------------------------------


def whole_variable(environ: Mapping[str, str], name: str, default: Optional[int] = None,
                   minimum: int = 0) -> Optional[int]:
    """The whole number an environment variable holds (`default` when it is unset or empty); anything else is
    one sentence naming the variable, before DeepSpeed or torch reads it (they raise a KeyError or a
    ValueError of their own, some only once a run has started)."""
    value = environ.get(name, "")
    if not value.strip():
        return default
    if not is_whole_number(value.strip()) or int(value) < minimum:
        least = f" of at least {minimum}" if minimum else ""
        raise GptError(f"{name}={shown_value(value)} is not a whole number{least}; a launcher sets it for each rank, "
                       "so set it right or unset it.")
    return int(value)


def shown_value(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:37] + "...")


def check_rank_environment(environ: Mapping[str, str]) -> None:
    """What every rank reads of its environment, checked in one place before anything starts: RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_PORT as a launcher (or adopt_cluster_ranks, from
    srun's or mpirun's) sets them."""
    env_port(environ)
    whole_variable(environ, "LOCAL_WORLD_SIZE", minimum=1)
    if "RANK" not in environ:
        return
    rank = whole_variable(environ, "RANK")
    world = whole_variable(environ, "WORLD_SIZE", minimum=1)
    if world is None:
        raise GptError(f"RANK={shown_value(environ['RANK'])} is set but WORLD_SIZE is not; a launcher sets both "
                       "(and LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so set them all or none.")
    if rank is not None and rank >= world:
        raise GptError(f"RANK={rank} is not below WORLD_SIZE={world}; ranks count from 0.")
    whole_variable(environ, "LOCAL_RANK")


# --- ranks started by srun, mpirun or torchrun -------------------------------------------------------------


def adopt_cluster_ranks(environ: MutableMapping[str, str] = os.environ) -> Optional[str]:
    """Translate the rank variables of srun or mpirun (Open MPI) into RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT in `environ` before DeepSpeed starts; returns the launcher's name, or None
    when there is nothing to translate. A process that is one of several started by a launcher that is
    not recognised is refused: it would otherwise train as if it were the only rank."""
    if "RANK" in environ:  # torchrun, DeepSpeed's launcher, gpt train --nproc, or set by hand
        return None
    for name, translate in (("srun", slurm_ranks), ("mpirun", open_mpi_ranks)):
        variables = translate(environ)
        if variables is not None:
            given = {key: environ[key] for key in ("MASTER_ADDR", "MASTER_PORT") if environ.get(key)}
            environ.update(variables | given)  # an address or port the user set wins
            return name
    refuse_unknown_launcher(environ)
    return None


def slurm_ranks(environ: Mapping[str, str]) -> Optional[dict[str, str]]:
    """A task of a SLURM job step (srun sets SLURM_STEP_ID; a batch script, which also sees SLURM_PROCID
    and SLURM_NTASKS, is one process and not translated). The master is the step's first node; the port,
    unless MASTER_PORT is set, is derived from the job and step ids so that every task picks the same."""
    if "SLURM_STEP_ID" not in environ or "SLURM_PROCID" not in environ:
        return None
    world = whole_variable(environ, "SLURM_STEP_NUM_TASKS") or whole_variable(environ, "SLURM_NTASKS") or 1
    whole_variable(environ, "SLURM_PROCID")
    if world <= 1:
        return None
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise GptError("srun started this task without SLURM_STEP_NODELIST or SLURM_NODELIST; set MASTER_ADDR.")
    job = whole_variable(environ, "SLURM_JOB_ID") or whole_variable(environ, "SLURM_JOBID") or 0
    step = int(environ["SLURM_STEP_ID"]) if is_whole_number(environ["SLURM_STEP_ID"]) else 0
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(world), "LOCAL_RANK": str(slurm_device_index(environ)),
            "MASTER_ADDR": first_host(nodelist), "MASTER_PORT": str(10000 + (job * 16 + step) % 20000)}


def slurm_device_index(environ: Mapping[str, str]) -> int:
    """LOCAL_RANK picks the GPU (torch.cuda.set_device). SLURM_LOCALID counts the tasks of a node; when SLURM
    binds each task to its own GPUs (--gpus-per-task), the task sees fewer GPUs than that index."""
    local = whole_variable(environ, "SLURM_LOCALID", 0) or 0
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return local % len(visible) if visible and local >= len(visible) else local


def open_mpi_ranks(environ: Mapping[str, str]) -> Optional[dict[str, str]]:
    """A process of Open MPI's mpirun. It names no master: on one machine it is 127.0.0.1, across machines
    MASTER_ADDR must be passed (`mpirun -x MASTER_ADDR=first-host`). The port, unless MASTER_PORT is set,
    is derived from the job's PMIx namespace (the same in every process), else torch's 29500."""
    if "OMPI_COMM_WORLD_RANK" not in environ:
        return None
    world = whole_variable(environ, "OMPI_COMM_WORLD_SIZE", 1) or 1
    whole_variable(environ, "OMPI_COMM_WORLD_RANK")
    if world <= 1:
        return None
    local_world = whole_variable(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", world)
    if local_world != world and not environ.get("MASTER_ADDR"):
        raise GptError("mpirun started ranks on several machines; pass the first machine's address as MASTER_ADDR "
                       "(mpirun -x MASTER_ADDR=HOST ...).")
    job = environ.get("PMIX_NAMESPACE") or environ.get("OMPI_MCA_ess_base_jobid")
    port = 10000 + zlib.crc32(job.encode()) % 20000 if job else 29500
    return {"RANK": environ["OMPI_COMM_WORLD_RANK"], "WORLD_SIZE": str(world),
            "LOCAL_RANK": environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


# Variables that say "you are one of N processes" in launchers gptcli cannot translate.
UNKNOWN_LAUNCHERS = (("PMI_SIZE", "an MPICH or Intel MPI launcher"), ("MV2_COMM_WORLD_SIZE", "MVAPICH's launcher"),
                     ("PMIX_RANK", "a PMIx launcher"), ("WORLD_SIZE", "a launcher that set WORLD_SIZE but not RANK"))


def refuse_unknown_launcher(environ: Mapping[str, str]) -> None:
    for variable, launcher in UNKNOWN_LAUNCHERS:
        value = environ.get(variable)
        if value is None or (is_whole_number(value) and int(value) <= 1 and variable != "PMIX_RANK"):
            continue
        if variable == "PMIX_RANK" and ("SLURM_JOB_ID" in environ or "OMPI_COMM_WORLD_SIZE" in environ):
            continue  # srun and mpirun set it too; a single task of theirs is a one-rank world
        raise GptError(f"This process was started by {launcher} ({variable}={value}), whose ranks gptcli cannot "
                       "tell apart; start the ranks with gpt train --nproc N, torchrun, srun or Open MPI's mpirun, "
                       "or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each.")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `node[01-04,07],gpu5` → `node01`, `a[3,5]-ib` → `a3-ib`."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if first is None:
        raise GptError(f"Cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR.")
    return re.sub(r"\[([^\]]*)\]", lambda ranges: re.split(r"[,-]", ranges.group(1))[0], first.group(0))


def refuse_launcher_options_in_rank(environ: Mapping[str, str], nproc: int, hostfile: Optional[Path]) -> None:
    if "RANK" in environ and (nproc > 1 or hostfile is not None):
        raise GptError(f"This process is already rank {environ['RANK']} of {environ.get('WORLD_SIZE', '?')} "
                       "started by a launcher; drop --nproc/--hostfile (they start ranks).")

