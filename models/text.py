"""Captions as tensors, without a download: a word-level tokenizer built from the training captions.

No weights can be fetched at run time, so the text path ships its own: this tokenizer, and a small
transformer text encoder trained jointly with the generator (models/mmdit.py). The tokenizer is
data, not code: :meth:`WordTokenizer.build` reads the training captions once and keeps every word
seen at least ``min_count`` times (most frequent first, up to ``max_words``), and it round-trips
through JSON, so it is stored beside the model that learnt its ids.

    text -> normalise (Unicode NFKC, lower case, words of letters and digits) -> ids, padded

Id 0 is padding and id 1 an unknown word. The empty caption is all padding: the null prompt of
classifier-free guidance. A caption longer than ``max_length`` words keeps its first
``max_length`` (:meth:`encode` says how many were cut, so a stage can count them).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PAD, UNK = 0, 1
SPECIALS = ("<pad>", "<unk>")
WORD = re.compile(r"[^\W_]+")  # runs of letters and digits, any script


def words(text: str) -> list[str]:
    """The words of ``text``: NFKC-normalised, lower-cased runs of letters and digits."""
    return WORD.findall(unicodedata.normalize("NFKC", text).lower())


def caption_text(raw: str | bytes | None, max_chars: int = 1000) -> tuple[str, str | None]:
    """A caption as the data gave it, made safe: (text, problem or None). Bytes that are not UTF-8 are
    decoded with replacement characters, which tokenise as nothing; None is the empty caption;
    text beyond ``max_chars`` characters is cut. The problem names what was done, for a stage to count."""
    if raw is None:
        return "", "missing"
    problem = None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raw, problem = raw.decode("utf-8", errors="replace"), "not UTF-8"
    text = " ".join(raw.split())  # newlines and runs of spaces: one space
    if len(text) > max_chars:
        text, problem = text[:max_chars], problem or f"longer than {max_chars} characters"
    if problem is None and not words(text):
        problem = "empty"
    return text, problem


@dataclass(frozen=True)
class WordTokenizer:
    """Words -> ids: ``vocab[i]`` is the word of id i (0 padding, 1 unknown); ``max_length`` ids a caption."""

    vocab: tuple[str, ...]
    max_length: int = 32

    def __post_init__(self) -> None:
        if tuple(self.vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}, got {tuple(self.vocab[:2])}")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("a vocabulary lists each word once")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        object.__setattr__(self, "_ids", {word: i for i, word in enumerate(self.vocab)})

    @classmethod
    def build(
        cls, captions: Iterable[str], max_words: int = 4096, min_count: int = 1, max_length: int = 32
    ) -> WordTokenizer:
        """The vocabulary of ``captions``: words seen at least ``min_count`` times, most frequent first
        (ties alphabetical, so the same captions give the same ids), at most ``max_words``."""
        counts = Counter(word for caption in captions for word in words(caption))
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(SPECIALS + tuple(ranked[:max_words]), max_length)

    @property
    def size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> tuple[list[int], int]:
        """(ids, words cut): the caption's ids, unknown words as UNK, at most ``max_length``."""
        ids = [self._ids.get(word, UNK) for word in words(text)]  # type: ignore[attr-defined]
        return ids[: self.max_length], max(0, len(ids) - self.max_length)

    def batch(self, texts: Sequence[str]) -> Tensor:
        """(N, max_length) long: each caption's ids, padded with PAD."""
        out = torch.full((len(texts), self.max_length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids, _ = self.encode(text)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The words of ``ids``, padding left out, joined by single spaces."""
        return " ".join(self.vocab[i] for i in ids if i != PAD)

    def to_json(self) -> str:
        return json.dumps({"vocab": list(self.vocab), "max_length": self.max_length})

    @classmethod
    def from_json(cls, text: str) -> WordTokenizer:
        data = json.loads(text)
        return cls(tuple(data["vocab"]), int(data["max_length"]))
