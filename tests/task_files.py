"""Small benchmark files in the Hub datasets' field layouts, a random model to score them with, and
lm-evaluation-harness's own task definitions pointed at those files.

The records are written here (no network, nothing from ../shared) and include what the preprocessing
must get right: WikiHow markup, double spaces, a lower-case ctx_b, an empty ctx_b, unicode, endings that start alike (they share rows of the packed prefix tree), a LAMBADA
passage whose context ends in a space, a one-word passage (empty context), and last words the model
predicts greedily (so LAMBADA's acc is not trivially 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HELLASWAG = [
    {"activity_label": "Washing dishes", "ctx_a": "A woman stands at a sink full of plates.", "ctx_b": "she",
     "endings": ["scrubs each plate with a yellow sponge.", "throws the plates out of the window.",
                 "sings to the fridge.", "turns off the lights and leaves."], "label": "0"},
    {"activity_label": "Home and Garden",
     "ctx_a": "[header] How to plant tulips [title] Choose a sunny spot. [step] Tulips need six hours of light.",
     "ctx_b": "", "endings": ["[substeps] Dig a hole  twice as deep as the bulb.", "Water the bulbs every hour.",
                              "[title] Plant them upside down. [step] This helps the roots.", "Buy a mower."],
     "label": "0"},
    {"activity_label": "Painting fence", "ctx_a": "A man holds a brush next to a wooden fence.",
     "ctx_b": "the man then", "endings": ["is using a brush to paint the boards.", "is using a roller to paint.",
                                          "is using nothing at all.", "walks away from the fence."], "label": "1"},
    {"activity_label": "Café", "ctx_a": "Le barista prépare un café crème.", "ctx_b": "il",
     "endings": ["sourit à la cliente.", "verse le lait chaud.", "ferme la boutique.", "lit le journal."],
     "label": "3"},
    {"activity_label": "Running", "ctx_a": "The  dog runs across the park.  It", "ctx_b": "He",
     "endings": [" runs fast.", "jumps over a bench.", "barks at a bird.", "sleeps under a tree."], "label": "2"},
    {"activity_label": "Cooking", "ctx_a": "A chef chops onions on a board.", "ctx_b": "THE CHEF",
     "endings": ["adds them to a pan.", "cries a little.", "puts down the knife."], "label": "1"},
    {"activity_label": "Tennis", "ctx_a": "Two players stand on a clay court.", "ctx_b": "they",
     "endings": ["hit the ball back and forth.", "hit the ball over the fence.", "shake hands at the net.",
                 "hit the ball."], "label": "3"},
    {"activity_label": "Sports and Fitness",
     "ctx_a": "[header] How to stretch [title] Warm up first. [step] A short walk raises your heart rate.",
     "ctx_b": "[title]", "endings": ["Hold each stretch for thirty seconds.", "Bounce as hard as you can.",
                                     "Skip the warm up.", "Stretch only your ears."], "label": "0"},
]

# PIQA-shaped records (goal, two solutions, the gold one's index), short enough for a 128-position model.
PIQA = [
    {"goal": "How do I dry wet shoes?", "sol1": "Stuff them with newspaper.", "sol2": "Put them in the oven.",
     "label": 0},
    {"goal": "To keep bread fresh", "sol1": "leave it in the sun.", "sol2": "keep it in a bread box.", "label": 1},
    {"goal": "How can I open a stuck jar lid?", "sol1": "Run the lid under hot water.",
     "sol2": "Freeze the jar overnight.", "label": 0},
    {"goal": "To cool soup quickly", "sol1": "stir it in a cold water bath.", "sol2": "cover it with a blanket.",
     "label": 0},
    {"goal": "How do you stop a squeaky hinge?", "sol1": "Paint over it.", "sol2": "Oil the hinge pin.",
     "label": 1},
    {"goal": "To find a lost contact lens", "sol1": "shine a flashlight across the floor.",
     "sol2": "vacuum the room first.", "label": 0},
]

LAMBADA = [
    "He opened the door and saw his old friend standing there in the rain",
    "She whispered the name  softly",
    'The answer, he said, was "yes"',
    "Hello",
    "Il a dit merci à la boulangère",
    "First line of the story.\nThe second line ends with a word",
    "They walked for hours until the road ended at the sea",
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    return path


def random_model(block_size: int = 128, seed: int = 7):
    """A small GPT with the GPT-2 vocabulary and every weight random (peaked logits, so the scores differ
    clearly between continuations and some tokens are greedy choices)."""
    from gptcli.config import project_from_dict
    from gptcli.model import build_model

    config = project_from_dict({"model": {"block_size": block_size, "n_layer": 2, "n_head": 4, "n_embd": 64}}).model
    torch.manual_seed(seed)
    model = build_model(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.1
            parameter.copy_(noise + 1.0 if ("ln" in name and name.endswith("weight")) else noise)
    return model.eval()


def greedy_passages(model, tokenizer, count: int = 4) -> list[str]:
    """LAMBADA passages whose last word is the model's greedy next token (a token that is " word")."""
    starts = ["The night was cold and", "When the train stopped at the", "Nobody knew why the", "In the morning",
              "After dinner we talked about", "Her brother always said", "The old clock in the hall",
              "At the end of the street", "Every summer they", "The letter said that"]
    passages = []
    for start in starts:
        ids = tokenizer.encode(start)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids]))
        word = tokenizer.decode([int(logits[0, -1].argmax())])
        if word.startswith(" ") and word[1:].isalpha() and word[1:].isascii():
            passages.append(start + word)
        if len(passages) == count:
            break
    return passages


def lm_eval_task(name: str, data_file: Path, cache_dir: Path):
    """lm-eval's own task (its installed YAML, preprocessing functions and metrics) reading `data_file`
    instead of its Hub dataset."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_file = {"hellaswag": "hellaswag/hellaswag.yaml", "lambada": "lambada/lambada_openai.yaml"}[name]
    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml_file)
    split = config.get("validation_split") or config["test_split"]
    config.update(task=f"{name}_local", dataset_path="json", dataset_name=None, training_split=None,
                  dataset_kwargs={"data_files": {split: str(data_file)}, "cache_dir": str(cache_dir)})
    return ConfigurableTask(config=config)
