"""GPT-1's tokenizer (Radford et al. 2018): BERT-style text cleaning and lower-casing, a split into words
and punctuation, then BPE over characters where a word's last symbol carries the suffix `</w>`.

The vocabulary is Hugging Face's `openai-gpt` pair of files: `vocab.json` (token → id, 40,478 entries:
the base symbols plus 40,000 merges) and `merges.txt` (one `left right` merge per line, best first),
read by tokenizer_files.py; tokenizer.py wraps this backend in a Tokenizer. This module imports neither.
Ids equal transformers' `OpenAIGPTTokenizer` (which uses the same cleaning rules, without ftfy/spacy).

GPT-1 has no end-of-text token, so its Tokenizer has eot_id None.
Symbols the vocabulary lacks become `<unk>` when the vocabulary has it, and are skipped otherwise
(transformers refuses such text then); `unknown_symbols` counts them.
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Optional

from .errors import GptError

WORD_END = "</w>"
UNK = "<unk>"
OPENAI_GPT_VOCAB_SIZE = 40478  # HF openai-gpt vocab.json: 478 base symbols + 40,000 merges

# CJK ideograph blocks that BERT's cleaning surrounds with spaces (Devlin et al. 2018, tokenization.py).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def _is_punctuation(char: str) -> bool:
    """ASCII symbols count as punctuation too (e.g. "$", "^", "`"), as in BERT."""
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def normalize_char(char: str) -> Optional[str]:
    """What one character becomes: None (control characters are dropped), " " for whitespace, a spaced
    CJK ideograph, or its NFD decomposition without combining marks (accents), lower-cased."""
    if char in "\x00\ufffd" or _is_control(char):
        return None
    if char.isspace():
        return " "
    if _is_cjk(char):
        return f" {char} "
    # Character by character, as transformers' normalizer does (so a word-final "Σ" becomes "σ", not "ς").
    return "".join(c.lower() for c in unicodedata.normalize("NFD", char) if unicodedata.category(c) != "Mn")


class _NormalizedChars(dict):
    """code point → normalize_char, filled on first sight; str.translate then runs at C speed."""

    def __missing__(self, code: int) -> Optional[str]:
        value = self[code] = normalize_char(chr(code))
        return value


_NORMALIZED = _NormalizedChars()


def normalize(text: str) -> str:
    """Drop control characters, map whitespace to spaces, space out CJK, strip accents, lower-case."""
    return text.translate(_NORMALIZED)


def pre_tokenize(text: str) -> list[str]:
    """Normalized text → words: split on spaces, and every punctuation character is a word of its own."""
    words: list[str] = []
    for chunk in text.split():
        start = 0
        for index, char in enumerate(chunk):
            if _is_punctuation(char):
                if index > start:
                    words.append(chunk[start:index])
                words.append(char)
                start = index + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


class OpenAIGPTBPE:
    """The backend a gptcli Tokenizer drives: encode_ordinary(_batch), decode, decode_bytes."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = encoder
        self.decoder = {index: token for token, index in encoder.items()}
        self.merges = merges
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.unk_id: Optional[int] = encoder.get(UNK)
        self.unknown_symbols = 0
        self._word_cache: dict[str, list[int]] = {}

    @property
    def n_vocab(self) -> int:
        return max(self.decoder) + 1

    def bpe(self, word: str) -> list[str]:
        """One word → its BPE symbols: merge the best-ranked adjacent pair everywhere, until none is left."""
        symbols = list(word[:-1]) + [word[-1] + WORD_END]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:], strict=False))  # each symbol with the next
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, index = [], 0
            while index < len(symbols):
                if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                    merged.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        return symbols

    def _word_ids(self, word: str) -> list[int]:
        ids = self._word_cache.get(word)
        if ids is None:
            ids = []
            for symbol in self.bpe(word):
                index = self.encoder.get(symbol, self.unk_id)
                if index is None or symbol not in self.encoder:
                    self.unknown_symbols += 1
                if index is not None:
                    ids.append(index)
            if len(self._word_cache) < 500_000:  # bounded: a corpus has a long tail of rare words
                self._word_cache[word] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in pre_tokenize(normalize(text)):
            ids.extend(self._word_ids(word))
        return ids

    def encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode_ordinary(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        """Ids → text: `</w>` ends a word (a space), except after the last token. Lower-cased, as encoded."""
        try:
            tokens = [self.decoder[int(index)] for index in ids]
        except KeyError as error:
            raise GptError(f"Token id {error.args[0]} is not in the openai-gpt vocabulary.") from None
        if not tokens:
            return ""
        body = "".join(token.replace(WORD_END, " ") for token in tokens[:-1])
        return body + tokens[-1].replace(WORD_END, "")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")


def vocabulary_fingerprint(encoder: dict[str, int], merges: list[tuple[str, str]]) -> str:
    """'openai-gpt:<16 hex>' over the ids and the merge order, so equal files give equal fingerprints."""
    digest = hashlib.sha256()
    for token, index in sorted(encoder.items(), key=lambda item: item[1]):
        digest.update(index.to_bytes(4, "little") + token.encode("utf-8") + b"\x00")
    for left, right in merges:
        digest.update(left.encode("utf-8") + b" " + right.encode("utf-8") + b"\n")
    return f"openai-gpt:{digest.hexdigest()[:16]}"
