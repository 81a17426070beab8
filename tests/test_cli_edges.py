"""The command line at its edges: a process without stdout or without a current directory, a Ctrl-C as gpt
exits, `gpt plot` on records without a loss or with no argument, and an unknown option that names a project
key. Each is one sentence or a quiet success, never "internal error", a traceback or a fatal library error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import gpt_env
from gptcli.errors import GptError
from in_process import gpt


def gpt_process(*argv: str, preexec_fn=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptcli", *argv], env=gpt_env(), capture_output=True, text=True,
                          preexec_fn=preexec_fn, cwd=cwd, timeout=600)


def test_a_closed_stdout_discards_the_output_with_a_note():
    """`gpt generate ... >&-` was an internal error (sys.stdout is None); worse, the next file gptcli opened
    became descriptor 1, and what it printed would have gone into it."""
    result = subprocess.run([sys.executable, "-m", "gptcli", "inspect-params", "gpt2", "--json"], env=gpt_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600,
                            preexec_fn=lambda: os.close(1))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "note: standard output is closed; what this command prints there is discarded.\n"


def test_a_deleted_current_directory_is_one_sentence(tmp_path):
    """prepare said FileNotFoundError; generate and export-hf died with "Intel oneMKL FATAL ERROR"."""
    gone = tmp_path / "gone"
    gone.mkdir()
    result = gpt_process("generate", "hi", "--checkpoint", str(tmp_path / "model"), cwd=gone,
                         preexec_fn=lambda: os.rmdir(gone))
    assert result.returncode == 1
    assert result.stderr == ("error: The current directory no longer exists (it was deleted or moved away); cd into "
                             "an existing directory and run the command again.\n")


def test_a_ctrl_c_as_gpt_exits_is_not_an_exception_ignored_at_shutdown(tmp_path):
    """SIGINT to prepare as it exited printed "Exception ignored ... KeyboardInterrupt" from Python's shutdown.
    Once the command has ended there is nothing to stop: gpt, as a program, ignores it."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        from gptcli import cli
        sys.argv = ["gpt", "--version"]
        try:
            cli.main()
        except SystemExit:
            pass
        os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C that arrives while the interpreter shuts down
        time.sleep(0.2)
        print("exited in order", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], env=gpt_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.endswith("exited in order\n"), result
    assert "KeyboardInterrupt" not in result.stderr and "Exception ignored" not in result.stderr


def test_in_process_callers_keep_their_own_ctrl_c(monkeypatch, capsys):
    handler = signal.getsignal(signal.SIGINT)
    gpt(monkeypatch, capsys, "--version")
    assert signal.getsignal(signal.SIGINT) == handler


def write_metrics(run_dir, records) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def test_plot_leaves_out_records_without_a_loss(tmp_path, capsys):
    """`gpt plot` on a metrics record without "loss" was a KeyError."""
    from gptcli.train.observing.metrics import plot_losses

    write_metrics(tmp_path / "run", [{"step": 1, "loss": 10.8}, {"step": 2}, {"step": 3, "loss": "x"},
                                     {"step": 4, "loss": 9.9, "eval_loss": "y"}])
    assert plot_losses(tmp_path / "run").read_bytes()[:4] == b"\x89PNG"
    assert "note: left out 2 record(s) of" in capsys.readouterr().err
    write_metrics(tmp_path / "empty", [{"step": 1}])
    with pytest.raises(GptError, match="has no steps to plot yet"):
        plot_losses(tmp_path / "empty")


def test_plot_without_an_argument_plots_the_projects_run(tmp_path, monkeypatch, capsys):
    write_metrics(tmp_path / "run", [{"step": 1, "loss": 10.8}, {"step": 2, "loss": 10.1}])
    (tmp_path / "run.toml").write_text(f'[project]\nout_dir = "{tmp_path / "run"}"\n')
    monkeypatch.chdir(tmp_path)
    code, said = gpt(monkeypatch, capsys, "plot")
    assert code == 0 and said == f"Wrote {tmp_path / 'run' / 'loss.png'}"
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, hint", [
    (["train", "--max-steps", "10"], "No such option: --max-steps; train.max_steps is a project key: --set "
                                     "train.max_steps=10"),
    (["train", "--lr=3e-4"], "train.lr is a project key: --set train.lr=3e-4"),
    (["train", "--seed", "3"], "project.seed or eval.seed or generate.seed is a project key: --set project.seed=3 or "
                               "--set eval.seed=3 or --set generate.seed=3"),
    (["load-hf", "gpt2", "--out", "x", "--max-steps", "5"], "train.max_steps is a project key: set it in the project "
                                                           "file"),
])
def test_an_unknown_option_that_names_a_project_key_says_how_to_set_it(monkeypatch, capsys, argv, hint):
    """`gpt train --max-steps 10` answered "(Possible options: --master-port)"."""
    code, said = gpt(monkeypatch, capsys, *argv)
    assert code == 2 and hint in said and "Possible options" not in said, said


def test_an_unknown_option_that_names_nothing_is_as_before(monkeypatch, capsys):
    code, said = gpt(monkeypatch, capsys, "train", "--bogus")
    assert code == 2 and "No such option: --bogus" in said
