"""Registries: the kinds of thing a researcher adds to gptcli without editing it.

Each kind has one registry here: optimizers, zero-shot tasks, experiment trackers, attention patterns and
training objectives. A project key that names one (`train.optimizer`, `eval.tasks`, `train.trackers`,
`model.attention`, `train.objective`) takes

    a name           a built-in, or an entry of an installed package in the registry's entry-point group
                     (`[project.entry-points."gptcli.optimizers"]  muon_mine = "my_package.optim:MUON"`)
    "package.module:attr"   an object of an importable module
    "file.py:attr"   an object of a Python file, a path relative to the project file's directory

The registries themselves import nothing heavy: a built-in is registered as the "module:attr" of the
object that defines it, and an entry point or a reference is imported only when the object is needed
(`resolve`). So the schema (config.py) checks a name without importing torch, and `--help`, the docs and
the metrics list what is registered. What each kind's object must provide is in docs/extending.md.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Optional

from .errors import GptError

# "package.module:attr" (dotted identifiers) or "some/file.py:attr".
MODULE_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
FILE_REFERENCE = re.compile(r"^(?P<file>.+\.py):(?P<attr>[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)$")


def is_reference(value: str) -> bool:
    """A value that names an object by where it is ("package.module:attr" or "file.py:attr"), not by name."""
    return bool(FILE_REFERENCE.match(value) or MODULE_REFERENCE.match(value))


@dataclass
class Registry:
    """One kind of registered thing.

    kind: what one is called in messages ("optimizer"); key: the project key that names one, for messages;
    group: the entry-point group installed packages add entries to; builtins: name → "module:attr" of
    gptcli's own entries, in the order lists show them; groups: a name that stands for several built-ins in
    a list of them (`eval.tasks = ["all"]`), expanded when the project is loaded (`expand`)."""

    kind: str
    key: str
    group: str
    builtins: dict[str, str]
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False)

    # --- names, without importing anything --------------------------------------------------------------

    def installed(self) -> dict[str, importlib.metadata.EntryPoint]:
        """Entries of installed packages, by name (a name a built-in has is the built-in's)."""
        return {name: entry for name, entry in entry_points(self.group).items() if name not in self.builtins}

    def names(self) -> list[str]:
        """Every name a project may give: the built-ins, then the installed entries."""
        return [*self.builtins, *sorted(self.installed())]

    def expand(self, values: list) -> list:
        """`values` with each group's name replaced by its members, in order; a name given twice this way
        (["all", "piqa"]) is kept once, where it first comes."""
        if not any(isinstance(value, str) and value in self.groups for value in values):
            return values
        return list(dict.fromkeys(member for value in values for member in self.groups.get(value, (value,))))

    def check(self, value: str, where: Optional[str] = None, base_dir: Optional[Path] = None) -> None:
        """Refuse, in one sentence, a value that is no registered name and no reference; for "file.py:attr",
        a file that is not there (relative to `base_dir`, the project file's directory). Imports nothing."""
        where = where or self.key
        if not isinstance(value, str) or not value:
            raise GptError(f"{where} must name a registered {self.kind} or a \"module:attr\" reference, not "
                           f"{value!r}.")
        if value in self.builtins or value in self.installed():
            return
        if value in self.groups:
            raise GptError(f'{where} names "{value}", a group of {self.kind}s ({", ".join(self.groups[value])}); '
                           f"name each {self.kind} here.")
        match = FILE_REFERENCE.match(value)
        if match:
            path = reference_file(match.group("file"), base_dir)
            if not path.is_file():
                raise GptError(f'{where} = "{value}" names {path}, which is not a file.')
            return
        if MODULE_REFERENCE.match(value):
            return
        close = difflib.get_close_matches(value, [*self.names(), *self.groups], n=1, cutoff=0.5)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise GptError(f'{where} names "{value}", which is not {article(self.kind)} {self.kind} '
                       f"({self.known()}; or \"package.module:attr\", or \"file.py:attr\" beside the project "
                       f"file){hint}.")

    def known(self) -> str:
        installed = sorted(self.installed())
        text = f"built in: {', '.join(self.builtins) or 'none'}"
        text += f"; groups: {', '.join(self.groups)}" if self.groups else ""
        return text + (f"; installed: {', '.join(installed)}" if installed else "")

    # --- objects ----------------------------------------------------------------------------------------

    def resolve(self, value: str, base_dir: Optional[Path] = None, where: Optional[str] = None) -> Any:
        """The object `value` names (importing its module the first time), or one GptError sentence."""
        where = where or self.key
        self.check(value, where, base_dir)
        cache_key = f"{value}@{base_dir}" if FILE_REFERENCE.match(value) else value
        if cache_key not in self._loaded:
            self._loaded[cache_key] = self._load(value, base_dir, where)
        return self._loaded[cache_key]

    def _load(self, value: str, base_dir: Optional[Path], where: str) -> Any:
        if value in self.builtins:
            return load_reference(self.builtins[value], where, value)
        installed = self.installed()
        if value in installed:
            entry = installed[value]
            try:
                return entry.load()
            except Exception as error:  # the plugin's own failure, whatever its type
                raise GptError(f'{where} = "{value}": the {self.kind} that {distribution_of(entry)} installs '
                               f"({entry.value}) failed to load: {first_line(error)}.") from None
        match = FILE_REFERENCE.match(value)
        if match:
            return load_file_attribute(reference_file(match.group("file"), base_dir), match.group("attr"), where,
                                       value)
        return load_reference(value, where, value)


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def reference_file(name: str, base_dir: Optional[Path]) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def attribute(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def load_reference(reference: str, where: str, value: str) -> Any:
    """"package.module:attr" → the object."""
    module_name, _, attr = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or the module's own failure
        raise GptError(f'{where} = "{value}": cannot import {module_name} ({first_line(error)}).') from None
    try:
        return attribute(module, attr)
    except AttributeError:
        raise GptError(f'{where} = "{value}": {module_name} has no {attr}.') from None


def load_file_attribute(path: Path, attr: str, where: str, value: str) -> Any:
    """An object of a Python file, imported as a module of its own (named after the file's path, so two
    files of one name do not collide, and registered in sys.modules so that pickling and dataclasses work)."""
    resolved = path.resolve()
    stem = re.sub(r"\W", "_", resolved.stem)
    name = f"gptcli_user_{stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, resolved)
        if spec is None or spec.loader is None:
            raise GptError(f'{where} = "{value}": {path} is not a Python file.')
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # the user's file failed: say where, in one sentence
            del sys.modules[name]
            raise GptError(f'{where} = "{value}": running {path} failed: {first_line(error)}.') from None
    try:
        return attribute(module, attr)
    except AttributeError:
        raise GptError(f'{where} = "{value}": {path} defines no {attr}.') from None


def distribution_of(entry: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    return f"the package {dist.name}" if dist is not None else "an installed package"


@cache
def entry_points(group: str) -> dict[str, importlib.metadata.EntryPoint]:
    """The installed entry points of `group`, by name (read once per process)."""
    return {entry.name: entry for entry in importlib.metadata.entry_points(group=group)}


# --- the registries ----------------------------------------------------------------------------------------
# Each built-in is defined by the module that owns it; here it is only named.

OPTIMIZERS = Registry("optimizer", "train.optimizer", "gptcli.optimizers",
                      {"adamw": "gptcli.optimizers:ADAMW", "muon": "gptcli.optimizers:MUON"})
_TASKS = {"hellaswag": "gptcli.tasks.benchmarks:HELLASWAG", "lambada": "gptcli.tasks.benchmarks:LAMBADA",
          "piqa": "gptcli.tasks.multiple_choice:PIQA", "arc_easy": "gptcli.tasks.multiple_choice:ARC_EASY",
          "arc_challenge": "gptcli.tasks.multiple_choice:ARC_CHALLENGE",
          "winogrande": "gptcli.tasks.multiple_choice:WINOGRANDE",
          "openbookqa": "gptcli.tasks.multiple_choice:OPENBOOKQA", "sciq": "gptcli.tasks.multiple_choice:SCIQ",
          "boolq": "gptcli.tasks.multiple_choice:BOOLQ"}
TASKS = Registry("task", "eval.tasks", "gptcli.tasks", _TASKS,
                 # "all": the zero-shot suite; "ai2_arc": both ARC sets, under lm-eval's name for the pair.
                 groups={"all": tuple(_TASKS), "ai2_arc": ("arc_easy", "arc_challenge")})
TRACKERS = Registry("tracker", "train.trackers", "gptcli.trackers",
                    {"tensorboard": "gptcli.train.observing.trackers:TensorBoardTracker",
                     "wandb": "gptcli.train.observing.trackers:WandbTracker",
                     "mlflow": "gptcli.train.observing.trackers:MlflowTracker"})
ATTENTION = Registry("attention pattern", "model.attention", "gptcli.attention",
                     {"causal": "gptcli.attention:CAUSAL", "bidirectional": "gptcli.attention:BIDIRECTIONAL",
                      "sliding_window": "gptcli.attention:SLIDING_WINDOW", "document": "gptcli.attention:DOCUMENT",
                      "document_sliding_window": "gptcli.attention:DOCUMENT_SLIDING_WINDOW",
                      "prefix": "gptcli.attention:PREFIX", "conditional": "gptcli.attention:CONDITIONAL"})
OBJECTIVES = Registry("objective", "train.objective", "gptcli.objectives",
                      {"next_token": "gptcli.objectives:NEXT_TOKEN", "prefix_lm": "gptcli.objectives:PREFIX_LM",
                       "conditional": "gptcli.objectives:CONDITIONAL", "masked_lm": "gptcli.objectives:MASKED_LM"})

REGISTRIES = {"optimizers": OPTIMIZERS, "tasks": TASKS, "trackers": TRACKERS, "attention": ATTENTION,
              "objectives": OBJECTIVES}
