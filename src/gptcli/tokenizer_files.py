"""Vocabulary files on disk: reading them for a tokenizer, writing them into model dirs and exports.

    vocab.json + merges.txt     Hugging Face's names: token → id (JSON) and one `left right` merge per line,
    encoder.json + vocab.bpe    OpenAI's names for the same two files (GPT-2)
    *.tiktoken                  tiktoken's format: one `base64(token bytes) rank` per line

GPT-2's files spell token bytes as printable characters (`bytes_to_unicode`); GPT-1's are plain text
with `</w>` marking a word's end. Both are read by the one `read_bpe_files`.

This module knows file formats only, not tokenizers (tokenizer.py builds those from what it reads here).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Optional

from .errors import GptError

VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
# HF's tokenizer description files, which AutoTokenizer reads beside vocab.json + merges.txt.
TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE = "tokenizer_config.json", "special_tokens_map.json"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, as used by encoder.json/vocab.bpe:
    printable Latin-1 bytes map to themselves, the other 68 bytes to chr(256 + n) in byte order."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# --- vocab.json + merges.txt ---------------------------------------------------------------------------------


def read_bpe_files(vocab_path: Path, merges_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A token → id map and the merge list, checked to belong together (every merge makes a listed token)."""
    try:
        encoder = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise GptError(f"{vocab_path} is not valid JSON.") from None
    if not isinstance(encoder, dict) or not all(isinstance(i, int) for i in encoder.values()):
        raise GptError(f"{vocab_path} is not a vocabulary (a JSON object of token → id).")
    merges = []
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise GptError(f"{merges_path} is not UTF-8 text: not a merges file.") from None
    for number, line in enumerate(lines, start=1):
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise GptError(f"{merges_path} line {number} is not `left right`: not a merges file.")
        merges.append((parts[0], parts[1]))
    missing = [a + b for a, b in merges if a + b not in encoder]
    if missing:
        raise GptError(f"{merges_path} makes {len(missing)} tokens that {vocab_path} lacks (e.g. {missing[0]!r}): "
                       "the two files do not belong together.")
    return encoder, merges


def write_bpe_files(directory: Path, encoder: dict[str, int], merges: list[tuple[str, str]]) -> list[str]:
    """vocab.json (ordered by id) and merges.txt (best merge first) in `directory`; returns their names."""
    directory = Path(directory)
    ordered = dict(sorted(encoder.items(), key=lambda item: item[1]))
    (directory / VOCAB_FILE).write_text(json.dumps(ordered, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = "".join(f"{left} {right}\n" for left, right in merges)
    (directory / MERGES_FILE).write_text("#version: 0.2\n" + lines, encoding="utf-8")
    return [VOCAB_FILE, MERGES_FILE]


def find_bpe_files(directory: Path) -> Optional[tuple[Path, Path]]:
    """The (vocab, merges) pair in `directory` under either name pair, or None."""
    for vocab_name, merges_name in (("encoder.json", "vocab.bpe"), (VOCAB_FILE, MERGES_FILE)):
        if (directory / vocab_name).is_file() and (directory / merges_name).is_file():
            return directory / vocab_name, directory / merges_name
    return None


# --- GPT-2's byte-level spelling -----------------------------------------------------------------------------


def byte_level_ranks(encoder: dict[str, int], where: Path) -> dict[bytes, int]:
    """GPT-2's token strings → tiktoken's mergeable ranks (token bytes → id)."""
    to_byte = {char: b for b, char in bytes_to_unicode().items()}
    try:
        return {bytes(to_byte[c] for c in token): rank for token, rank in encoder.items()}
    except KeyError as error:
        raise GptError(f"{where} spells a token with {error.args[0]!r}, which is not one of GPT-2's byte "
                       "characters: not a byte-level BPE vocabulary.") from None


def byte_level_vocabulary(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks → GPT-2's vocab.json map and merge list (the inverse of reading them)."""
    to_text = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(to_text[b] for b in token)

    encoder = {spell(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])}
    return encoder, [(spell(a), spell(b)) for a, b in merges_from_ranks(ranks)]


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover a byte-level BPE merge list from tiktoken ranks: BPE on each token's bytes with only the
    merges ranked below it ends in exactly two parts, and those two parts are the merge that made it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            candidates = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best_rank, index = min(candidates)
            if best_rank >= rank:
                raise GptError(f"Token rank {rank} cannot be built from lower-ranked merges: not a BPE vocabulary.")
            parts[index:index + 2] = [parts[index] + parts[index + 1]]
        merges.append((parts[0], parts[1]))
    return merges


# --- .tiktoken -----------------------------------------------------------------------------------------------


def read_tiktoken_file(path: Path) -> dict[bytes, int]:
    """A `.tiktoken` file: one `base64(token bytes) rank` per line."""
    return parse_tiktoken(path.read_bytes(), path)


def tiktoken_bytes(ranks: dict[bytes, int]) -> bytes:
    """The ranks as a `.tiktoken` file's contents, in rank order."""
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    return b"\n".join(base64.b64encode(token) + b" " + str(rank).encode() for token, rank in ordered) + b"\n"


def parse_tiktoken(data: bytes, path: Path) -> dict[bytes, int]:
    try:  # one comprehension: twice as fast as the loop below, which finds the line to name when this fails
        return {base64.b64decode(token, validate=True): int(rank)
                for token, rank in (line.split() for line in data.splitlines() if line.strip())}
    except (ValueError, TypeError):
        pass
    ranks = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise GptError(f"{path} line {number} is not `base64-token rank`: not a .tiktoken file.") from None
    return ranks


def write_tiktoken_file(path: Path, ranks: dict[bytes, int]) -> None:
    path.write_bytes(tiktoken_bytes(ranks))


# --- Hugging Face tokenizer dirs -----------------------------------------------------------------------------


def write_hf_tokenizer(directory: Path, encoder: dict[str, int], merges: list[tuple[str, str]],
                       tokenizer_config: dict, special: dict[str, str]) -> list[str]:
    """vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json, as AutoTokenizer reads
    them; `tokenizer_config` names the class and its options. Returns the names written."""
    directory = Path(directory)
    files = write_bpe_files(directory, encoder, merges)
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps({**tokenizer_config, **special}, indent=2) + "\n")
    (directory / SPECIAL_TOKENS_FILE).write_text(json.dumps(special, indent=2) + "\n")
    return files + [TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE]
