"""The variables cluster launchers set for the processes they start (srun's job steps, Open MPI's mpirun), for
the tests of adopting them (test_launch.py) and of training under them (test_train_distributed.py)."""

from __future__ import annotations


def srun_task(procid: int, ntasks: int = 2, nodelist: str = "gpu[07-08,11]", **extra) -> dict:
    """The variables srun sets for one task of a job step (those this code reads and their neighbours)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid % 2), "SLURM_NODEID": str(procid // 2),
            "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist, **extra}


def open_mpi_process(rank: int, size: int = 2, local_size: int = 2, **extra) -> dict:
    """The variables Open MPI's mpirun sets for one process."""
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % local_size), "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
            "OMPI_COMM_WORLD_NODE_RANK": str(rank // local_size), "PMIX_RANK": str(rank),
            "PMIX_NAMESPACE": "prterun-host-31337@1", **extra}


def job_on_ports(launcher: str, ports: range) -> list[dict]:
    """The variables of two processes of one job on this machine, as `launcher` ("srun" or "mpirun") sets them,
    for a job whose rendezvous port (which gptcli derives from the job id, or from mpirun's PMIx namespace:
    launch.adopt_cluster_ranks) lies in `ports`: a test process's own ports (conftest.worker_ports), which no
    other test process uses at the same time."""
    from itertools import count

    from gptcli.train.launching.launch import adopt_cluster_ranks

    for job in count(1):
        if launcher == "srun":
            environs = [srun_task(rank, nodelist="localhost", SLURM_JOB_ID=str(job), SLURM_JOBID=str(job))
                        for rank in (0, 1)]
        else:
            environs = [open_mpi_process(rank, PMIX_NAMESPACE=f"prterun-test-{job}@1") for rank in (0, 1)]
        adopted = dict(environs[0])
        adopt_cluster_ranks(adopted)
        if int(adopted["MASTER_PORT"]) in ports:
            return environs
    raise AssertionError("unreachable")
