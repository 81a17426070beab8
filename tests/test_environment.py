"""The environment a rank reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_PORT, and srun's and
mpirun's variables it is translated from) is checked in one place, before DeepSpeed starts: a value that is no
number is one sentence naming the variable, not a KeyError, a ValueError, or a fault found once DeepSpeed runs."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from gptcli.errors import GptError

SRUN = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "localhost"}
MPIRUN = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}


@pytest.mark.parametrize("environ, fragment", [
    ({"MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not a port number (1-65535)"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT='70000' is not a port number (1-65535)"),
    ({"LOCAL_WORLD_SIZE": "abc"}, "LOCAL_WORLD_SIZE='abc' is not a whole number of at least 1"),
    ({"RANK": "abc"}, "RANK='abc' is not a whole number"),
    ({"RANK": "0"}, "RANK='0' is set but WORLD_SIZE is not"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "²"}, "WORLD_SIZE='²' is not a whole number of at least 1"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not a whole number"),
    ({**SRUN, "SLURM_NTASKS": "two"}, "SLURM_NTASKS='two' is not a whole number"),
    ({**SRUN, "SLURM_NTASKS": "2", "SLURM_LOCALID": "-1"}, "SLURM_LOCALID='-1' is not a whole number"),
    ({**MPIRUN, "OMPI_COMM_WORLD_SIZE": "x"}, "OMPI_COMM_WORLD_SIZE='x' is not a whole number"),
    ({**MPIRUN, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "y"},
     "OMPI_COMM_WORLD_LOCAL_SIZE='y' is not a whole number"),
], ids=["port", "port-range", "local-world", "rank", "rank-alone", "rank-too-high", "world-superscript",
        "local-rank", "slurm-ntasks", "slurm-localid", "ompi-size", "ompi-local-size"])
def test_a_rank_variable_that_is_no_number_is_one_sentence_naming_it(environ, fragment):
    from gptcli.train.launching.launch import adopt_cluster_ranks, check_rank_environment

    with pytest.raises(GptError) as refused:
        adopt_cluster_ranks(dict(environ))  # srun's and mpirun's are read there
        check_rank_environment(dict(environ))
    assert fragment in str(refused.value)


def test_good_variables_pass_and_srun_is_translated():
    from gptcli.train.launching.launch import adopt_cluster_ranks, check_rank_environment

    environ = {**SRUN, "SLURM_NTASKS": "2", "SLURM_JOB_ID": "77", "MASTER_PORT": "29500"}
    assert adopt_cluster_ranks(environ) == "srun"
    check_rank_environment(environ)
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"]) == ("0", "2", "0")
    check_rank_environment({})  # a plain single-process run sets none of them


@pytest.mark.parametrize("variable, value", [("MASTER_PORT", "abc"), ("RANK", "abc"), ("LOCAL_WORLD_SIZE", "abc")])
def test_gpt_train_names_the_variable_before_reading_the_project(tmp_path, monkeypatch, capsys, variable, value):
    """`MASTER_PORT=abc gpt train` on one rank was found only after DeepSpeed had started; `RANK=abc` without
    WORLD_SIZE was a KeyError."""
    from gptcli import cli

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(sys, "argv", ["gpt", "train", "--project", str(tmp_path / "missing.toml")])
    handler = signal.getsignal(signal.SIGTERM)
    environment = dict(os.environ)
    try:
        with pytest.raises(SystemExit) as exit:
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, handler)
        os.environ.clear()
        os.environ.update(environment)
    said = " ".join(capsys.readouterr().err.split())
    assert exit.value.code == 1 and f"{variable}='{value}'" in said and "missing.toml" not in said, said
