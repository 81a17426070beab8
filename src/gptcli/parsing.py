"""Reading what users write (numbers, TOML, JSON) within bounds, in one place.

Python's parsers have limits of their own that surface as the wrong exception: an integer of more than
CPython's 4,300 digits is a plain ValueError ("Exceeds the limit ... for integer string conversion"),
raised by `int()`, by tomllib and by json alike; a value nested a few thousand deep exhausts the
interpreter's stack (RecursionError), in tomllib's recursive descent as in json's C scanner; and
`str.isdigit` accepts "²" and other digits `int()` refuses. Every number, project file, `--set` value and
JSON line gptcli reads goes through here, so each of those is a ValueError that says which limit it broke
(`TooLarge`), which the caller turns into its own one sentence.
"""

from __future__ import annotations

import json
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

# CPython's limit on the digits of an int read from text (sys.int_info.default_max_str_digits, 4,300 since
# 3.11 and the 3.10.7 security release); 0 where the interpreter has none.
MAX_DIGITS = getattr(sys.int_info, "default_max_str_digits", 4300) or 4300
# Deeper nesting than any project file or dataset record needs; json's C scanner and tomllib recurse
# once a level, and the interpreter's stack (sys.getrecursionlimit(), 1,000 by default) ends first.
MAX_DEPTH = 100


class TooLarge(ValueError):
    """A value past one of the bounds above; its text says which."""


def too_large(error: BaseException) -> TooLarge | None:
    """The bound `error` (raised while parsing) ran into, in words; None for any other parse error."""
    if isinstance(error, RecursionError):
        return TooLarge(f"it nests values deeper than Python can read (keep it under {MAX_DEPTH} levels)")
    if isinstance(error, ValueError) and "integer string conversion" in str(error):
        return TooLarge(f"it holds an integer of more than {MAX_DIGITS:,} digits")
    return None


def loads_toml(text: str) -> dict[str, Any]:
    """tomllib.loads; a value past the bounds is TooLarge, other faults tomllib.TOMLDecodeError."""
    try:
        return tomllib.loads(text)
    except (ValueError, RecursionError) as error:
        bound = too_large(error)
        if bound is None:
            raise
        raise bound from None


def loads_json(text: str) -> Any:
    """json.loads; a value past the bounds is TooLarge, other faults json.JSONDecodeError."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        bound = too_large(error)
        if bound is None:
            raise
        raise bound from None


# The C scanner json.loads ends in, without its per-call wrapping (set by JSONDecoder.__init__, which typeshed's
# stub of JSONDecoder does not declare).
_scan_json = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_JSON_SPACE = " \t\r\n"


def one_json_value(line: str) -> Any:
    """json.loads(line), exactly (one value, JSON whitespace around it), at about half its per-call cost:
    records of a JSONL file are short, so the wrapping around the C scanner is a large part of the work.
    Any fault is a ValueError (TooLarge for a value past the bounds)."""
    start = len(line) - len(line.lstrip(_JSON_SPACE))
    try:
        value, end = _scan_json(line, start)
    except StopIteration:
        raise ValueError("no JSON value") from None
    except (ValueError, RecursionError) as error:
        raise too_large(error) or ValueError(str(error)) from None
    if line[end:].strip(_JSON_SPACE):
        raise ValueError("extra data after the JSON value")
    return value


def is_whole_number(text: str) -> bool:
    """`text` is the ASCII digits of a number `int()` reads (not "²", "٣" or 5,000 digits)."""
    return 0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit()


def shown(value: Any, width: int = 40) -> str:
    """A value for a message, cut to `width` characters (a number of thousands of digits is no sentence)."""
    try:
        text = repr(value)
    except ValueError:  # an int past MAX_DIGITS cannot even be printed
        return f"an integer of more than {MAX_DIGITS:,} digits"
    return text if len(text) <= width else text[: width - 3] + "..."
