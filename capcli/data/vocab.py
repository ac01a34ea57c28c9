"""Vocabulary: index <-> token, with <pad>=0, <start>, <end>, <unk>; built from training captions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from capcli.errors import UserError
from capcli.store.files import write_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)


class Vocab:
    def __init__(self, itos: Sequence[str]):
        if list(itos[:4]) != list(SPECIALS):
            raise UserError(f"vocabulary must start with {SPECIALS}, got {list(itos[:4])}")
        self.itos = list(itos)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.pad, self.start, self.end, self.unk = range(4)

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, tokenized: Iterable[Sequence[str]], min_freq: int = 5) -> "Vocab":
        """Tokens seen at least ``min_freq`` times, most frequent first (ties alphabetical)."""
        counts = Counter(t for toks in tokenized for t in toks)
        words = sorted((w for w, c in counts.items() if c >= min_freq and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words)

    def encode(self, tokens: Sequence[str], max_length: int) -> list[int]:
        """<start> w1 .. wn <end> (n <= max_length), padded with <pad> to max_length + 2."""
        ids = [self.stoi.get(t, self.unk) for t in tokens[:max_length]]
        ids = [self.start] + ids + [self.end]
        return ids + [self.pad] * (max_length + 2 - len(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <end>, without <start>/<pad>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i in (self.pad, self.start):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(words)

    def save(self, path: Path) -> None:
        write_json(path, self.itos, indent=None)

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        if not Path(path).is_file():
            raise UserError(f"vocabulary {path} is missing; run `capcli prepare` to make the dataset dir")
        redo = f"rerun `capcli prepare ... --out {Path(path).parent} --overwrite` to rebuild it"
        try:
            itos = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"vocabulary {path} is not valid JSON ({str(exc)[:120]}); {redo}") from exc
        if not isinstance(itos, list) or not all(isinstance(t, str) for t in itos) or list(itos[:4]) != list(SPECIALS):
            raise UserError(f"{path} is not a vocabulary (a JSON list of tokens starting with "
                            f"{', '.join(SPECIALS)}); {redo}")
        return cls(itos)
