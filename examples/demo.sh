#!/usr/bin/env bash
# The whole loop on a laptop, a few minutes on 2 CPU cores: prepare → train → generate → eval.
#
#   bash examples/demo.sh                 # corpus: the docstrings of the Python standard library
#   bash examples/demo.sh my-texts/ *.txt # or any files, directories, .jsonl
#
# Everything lands in $GPT_DEMO_DIR (default runs/demo): docstrings.jsonl (the built-in corpus), data/ (shards),
# run/ (checkpoints, metrics, loss.png, the consolidated model/). The model is examples/cpu-demo.toml's: the nano
# preset, 400 steps with Muon.
set -euo pipefail
examples=$(cd "$(dirname "$0")" && pwd)
demo=${GPT_DEMO_DIR:-runs/demo}
# No trailing space: GPT-2's BPE puts the space before a word into the word's token (" value"), so a prompt that
# ends in a space ends in a token the model has mostly seen inside runs of indentation.
prompt='Return the'

if [ $# -eq 0 ]; then
  # Every machine with Python has this corpus: the docstrings of the standard library's public modules, about
  # 0.8 MB of English (stdlib_docstrings.py says why not the source itself).
  mkdir -p "$demo"
  python "$examples/stdlib_docstrings.py" "$demo/docstrings.jsonl"
  set -- "$demo/docstrings.jsonl"
else
  prompt='The'
fi

echo "== 1/4 gpt prepare ($# inputs) → $demo/data"
# prepare ends with a `next:` line for someone typing the commands; this script goes on by itself, so
# that line is dropped (TTY_COMPATIBLE keeps rich's colours through the pipe on a terminal).
colours=$([ -t 1 ] && echo 1 || true)
TTY_COMPATIBLE=$colours gpt prepare "$@" --out "$demo/data" --val-fraction 0.05 --force | sed '/^next: /d'

echo "== 2/4 gpt train --project examples/cpu-demo.toml → $demo/run"
# --restart: a second demo starts its run over; it deletes only what gpt train wrote in $demo/run.
gpt train --project "$examples/cpu-demo.toml" --restart \
  --set "data.dir=\"$demo/data\"" --set "project.out_dir=\"$demo/run\"" --set "train.sample_prompt=\"$prompt\""

echo "== 3/4 gpt generate"
gpt generate "$prompt" --checkpoint "$demo/run" --max-new-tokens 60 --seed 1

echo "== 4/4 gpt eval on the held-out documents"
gpt eval --project "$examples/cpu-demo.toml" --set "data.dir=\"$demo/data\"" --set "project.out_dir=\"$demo/run\""
