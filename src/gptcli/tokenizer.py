"""Tokenizers: GPT-2's byte-level BPE through tiktoken, and GPT-1's BPE (openai_bpe.py).

The GPT-2 vocabulary comes from one of three sources, tried in this order:
  1. a local vocabulary (`[data] vocab_dir`): a directory holding `encoder.json` + `vocab.bpe`
     (OpenAI's names) or `vocab.json` + `merges.txt` (Hugging Face's names), or a `.tiktoken` file;
  2. tiktoken's own `gpt2` encoding: its cache (TIKTOKEN_CACHE_DIR) or a download when online.
Every source yields the same ranks; the fingerprint (name + hash of the ranks) proves it, and goes into
every shard, manifest and model dir. The files themselves are read and written by tokenizer_files.py.

tiktoken builds its `gpt2` ranks from OpenAI's original files in Python, about a quarter of a second at
every start. After that first build gptcli keeps the ranks as a `.tiktoken` file in its cache dir
(GPTCLI_CACHE_DIR, else $XDG_CACHE_HOME/gptcli or ~/.cache/gptcli) and reads that instead, but only when
the file's sha256 is that of GPT-2's ranks, so the cache can only ever hold exactly them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from .errors import GptError
from .openai_bpe import OpenAIGPTBPE, vocabulary_fingerprint
from .tokenizer_files import (
    MERGES_FILE,
    VOCAB_FILE,
    byte_level_ranks,
    byte_level_vocabulary,
    find_bpe_files,
    parse_tiktoken,
    read_bpe_files,
    read_tiktoken_file,
    tiktoken_bytes,
    write_bpe_files,
    write_hf_tokenizer,
    write_tiktoken_file,
)

ENDOFTEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
# GPT-2's ranks as a .tiktoken file (tokenizer_files.tiktoken_bytes), and their fingerprint: the same figures
# from every source (tests/test_tokenizer.py computes both from tiktoken's own gpt2 encoding).
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_FINGERPRINT = "gpt2:a89fe44b681b55a5"
RANKS_CACHE_FILE = f"gpt2-{GPT2_TIKTOKEN_SHA256[:16]}.tiktoken"
TOKENIZER_FILE = "tokenizer.gptcli.json"  # the description a model dir carries


def ranks_fingerprint(name: str, ranks: dict[bytes, int], special: dict[str, int]) -> str:
    digest = hashlib.sha256()
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        digest.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    digest.update(json.dumps(special, sort_keys=True).encode())
    return f"{name}:{digest.hexdigest()[:16]}"


@dataclass
class Tokenizer:
    """Encode and decode text; the same interface for GPT-2 (tiktoken) and GPT-1 (openai_bpe)."""

    name: str
    backend: Any  # tiktoken.Encoding, or openai_bpe.OpenAIGPTBPE
    vocab_size: int
    eot_id: Optional[int]  # end-of-text token that marks document ends; None when the vocabulary has none
    fingerprint: str
    source: str  # where the vocabulary was read from, for messages

    def encode(self, text: str) -> list[int]:
        """Text → ids; special-token text such as "<|endoftext|>" in the input is encoded as plain text."""
        return self.backend.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.backend.encode_ordinary_batch(texts)

    def encode_each(self, texts: list[str]) -> list[list[int]]:
        """`encode` of every text, in this thread. For many short texts (a document per line) the two
        Python wrapper frames around tiktoken's BPE core cost ~15% of the work, so call the core directly;
        text with lone surrogates (which the core refuses) goes through tiktoken's own repair path."""
        core = getattr(self.backend, "_core_bpe", None)
        if core is None:
            return [self.backend.encode_ordinary(text) for text in texts]
        try:
            return [core.encode_ordinary(text) for text in texts]
        except UnicodeEncodeError:
            return [self.backend.encode_ordinary(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.backend.decode_bytes(list(ids))

    def save(self, directory: Path) -> None:
        """Write what loading this tokenizer offline needs into a model dir."""
        directory = Path(directory)
        if self.name == "gpt2":
            write_tiktoken_file(directory / "gpt2.tiktoken", self.backend._mergeable_ranks)
            files = ["gpt2.tiktoken"]
        else:
            files = write_bpe_files(directory, self.backend.encoder, self.backend.merges)
        description = {"name": self.name, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
                       "eot_id": self.eot_id, "files": files}
        (directory / TOKENIZER_FILE).write_text(json.dumps(description, indent=2) + "\n")

    def save_for_hf(self, directory: Path, model_max_length: int) -> list[str]:
        """Write the files AutoTokenizer loads (vocab.json, merges.txt, tokenizer_config.json,
        special_tokens_map.json) into a Hugging Face dir; returns their names."""
        if self.name == "gpt2":
            encoder, merges = byte_level_vocabulary(self.backend._mergeable_ranks)  # merges rebuilt from ranks
            encoder[ENDOFTEXT] = GPT2_EOT_ID
            special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
            config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False}
        else:
            encoder, merges = self.backend.encoder, self.backend.merges
            special = {"unk_token": "<unk>"}
            config = {"tokenizer_class": "OpenAIGPTTokenizer"}
        config["model_max_length"] = model_max_length
        return write_hf_tokenizer(Path(directory), encoder, merges, config, special)


def gpt2_encoding(ranks: dict[bytes, int]):
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex

    encoding = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={ENDOFTEXT: GPT2_EOT_ID})
    return encoding


def _gpt2_ranks_from_local(path: Path) -> dict[bytes, int]:
    if path.is_file():
        if path.suffix != ".tiktoken":
            raise GptError(f"Vocabulary file {path} is not a .tiktoken file.")
        return read_tiktoken_file(path)
    if not path.is_dir():
        raise GptError(f"Vocabulary {path} does not exist.")
    pair = find_bpe_files(path)
    if pair is not None:
        vocab_path, merges_path = pair
        encoder, merges = read_bpe_files(vocab_path, merges_path)
        encoder.pop(ENDOFTEXT, None)  # a special token, not a BPE rank
        ranks = byte_level_ranks(encoder, vocab_path)
        if len(merges) != len(ranks) - 256:  # GPT-2 has one token per byte, then one per merge
            raise GptError(f"{merges_path} has {len(merges)} merges but {vocab_path} implies "
                           f"{len(ranks) - 256}: the two files do not belong together.")
        return ranks
    tiktoken_files = sorted(path.glob("*.tiktoken"))
    if tiktoken_files:
        return read_tiktoken_file(tiktoken_files[0])
    raise GptError(f"Vocabulary dir {path} holds neither encoder.json+vocab.bpe, vocab.json+merges.txt "
                   "nor a .tiktoken file.")


def _gpt2_ranks_from_tiktoken() -> dict[bytes, int]:
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")._mergeable_ranks
    except Exception as error:  # tiktoken raises requests/OSError/ValueError variants when offline
        raise GptError(
            "Could not load the GPT-2 vocabulary: no local vocabulary was given and tiktoken could not "
            f"read or download its 'gpt2' files ({type(error).__name__}); set TIKTOKEN_CACHE_DIR to a tiktoken "
            "cache, or set [data] vocab_dir (--vocab-dir) to a dir with encoder.json+vocab.bpe or "
            "vocab.json+merges.txt, or to a .tiktoken file."
        ) from None


@lru_cache(maxsize=8)
def load_tokenizer(name: str = "gpt2", vocab_dir: Optional[str] = None) -> Tokenizer:
    """The tokenizer `name` ("gpt2" or "openai-gpt"), from `vocab_dir` when given."""
    if name == "openai-gpt":
        return _openai_gpt_tokenizer(vocab_dir)
    if name != "gpt2":
        raise GptError(f'Unknown tokenizer "{name}" (known: gpt2, openai-gpt).')
    fingerprint = None
    if vocab_dir:
        ranks, source = _gpt2_ranks_from_local(Path(vocab_dir)), str(vocab_dir)
        if Path(vocab_dir).is_file() and _is_gpt2_tiktoken_file(Path(vocab_dir)):
            fingerprint = GPT2_FINGERPRINT  # the file's sha256 proves these are GPT-2's ranks (a model dir's)
    else:
        cached, source = _cached_gpt2_ranks(), "tiktoken"
        if cached is not None:
            ranks, fingerprint = cached, GPT2_FINGERPRINT  # the file's sha256 proved these are GPT-2's ranks
        else:
            ranks = _gpt2_ranks_from_tiktoken()
            _cache_gpt2_ranks(ranks)
    if len(ranks) != GPT2_VOCAB_SIZE - 1:
        raise GptError(f"The vocabulary from {source} has {len(ranks)} tokens, not GPT-2's {GPT2_VOCAB_SIZE - 1} "
                       "(plus end-of-text).")
    encoding = gpt2_encoding(ranks)
    fingerprint = fingerprint or ranks_fingerprint("gpt2", ranks, {ENDOFTEXT: GPT2_EOT_ID})
    return Tokenizer(name="gpt2", backend=encoding, vocab_size=GPT2_VOCAB_SIZE, eot_id=GPT2_EOT_ID,
                     fingerprint=fingerprint, source=source)


def _is_gpt2_tiktoken_file(path: Path) -> bool:
    """Whether a .tiktoken file holds exactly GPT-2's ranks, as every model dir's gpt2.tiktoken does: hashing
    the file (a few ms) spares computing the fingerprint from the parsed ranks (~0.1 s of every load)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == GPT2_TIKTOKEN_SHA256
    except OSError:
        return False


def cache_dir() -> Path:
    """Where gptcli keeps what it can rebuild: GPTCLI_CACHE_DIR, else $XDG_CACHE_HOME/gptcli, else ~/.cache/gptcli."""
    if os.environ.get("GPTCLI_CACHE_DIR"):
        return Path(os.environ["GPTCLI_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptcli"


def _cached_gpt2_ranks() -> Optional[dict[bytes, int]]:
    """GPT-2's ranks from gptcli's cache, or None when the file is missing, unreadable or not exactly them."""
    path = cache_dir() / RANKS_CACHE_FILE
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != GPT2_TIKTOKEN_SHA256:
        return None
    return parse_tiktoken(data, path)


def _cache_gpt2_ranks(ranks: dict[bytes, int]) -> None:
    """Keep tiktoken's ranks for the next start when they are GPT-2's; a cache that cannot be written is
    simply not kept."""
    from .fsutil import atomic_path

    data = tiktoken_bytes(ranks)
    if hashlib.sha256(data).hexdigest() != GPT2_TIKTOKEN_SHA256:
        return
    try:
        with atomic_path(cache_dir() / RANKS_CACHE_FILE) as tmp:
            tmp.write_bytes(data)
    except OSError:
        pass


def _openai_gpt_tokenizer(vocab_dir: Optional[str]) -> Tokenizer:
    """GPT-1's tokenizer from a dir holding vocab.json + merges.txt (there is no built-in copy)."""
    if not vocab_dir:
        raise GptError('The "openai-gpt" tokenizer needs a vocabulary dir with vocab.json + merges.txt: set '
                       "[data] vocab_dir (or --vocab-dir), e.g. to a download of Hugging Face's openai-gpt.")
    directory = Path(vocab_dir)
    if not directory.is_dir():
        raise GptError(f"Vocabulary dir {directory} does not exist.")
    if not ((directory / VOCAB_FILE).is_file() and (directory / MERGES_FILE).is_file()):
        raise GptError(f"The openai-gpt tokenizer needs {VOCAB_FILE} and {MERGES_FILE} in {directory} "
                       "(Hugging Face's openai-gpt repository has both).")
    encoder, merges = read_bpe_files(directory / VOCAB_FILE, directory / MERGES_FILE)
    backend = OpenAIGPTBPE(encoder, merges)
    return Tokenizer(name="openai-gpt", backend=backend, vocab_size=backend.n_vocab, eot_id=None,
                     fingerprint=vocabulary_fingerprint(encoder, merges), source=str(directory))


def load_from_model_dir(directory: Path) -> Tokenizer:
    """The tokenizer a model dir describes (written by Tokenizer.save)."""
    directory = Path(directory)
    description_path = directory / TOKENIZER_FILE
    if not description_path.is_file():
        raise GptError(f"{directory} has no {TOKENIZER_FILE}: it is not a gptcli model dir.")
    try:
        description = json.loads(description_path.read_text(encoding="utf-8"))
        name, files, fingerprint = description["name"], description["files"], description["fingerprint"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise GptError(f"{description_path} is not a gptcli tokenizer description.") from None
    if name == "gpt2":
        tokenizer = load_tokenizer("gpt2", str(directory / files[0]))
    else:
        tokenizer = load_tokenizer(name, str(directory))
    if tokenizer.fingerprint != fingerprint:
        raise GptError(f"The tokenizer files in {directory} do not match its {TOKENIZER_FILE} fingerprint.")
    return tokenizer
