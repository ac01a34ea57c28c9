"""Captions to token ids for ``prepare``: every caption tokenised once (in the worker pool for
large sets) into a flat :class:`TokenTable`, the vocabulary built from the training captions, and
each image's training captions encoded as fixed-length rows."""

from __future__ import annotations

import random
from array import array
from typing import Callable

import numpy as np

from capcli.data.parallel import WorkerPool, ordered_map
from capcli.data.records import Record
from capcli.data.vocab import SPECIALS, Vocab
from capcli.text import tokenize

ProgressFn = Callable[[str, int, int], None]


class TokenTable:
    """Every caption's tokens in one flat int32 array (about 4 bytes a token, not a Python list
    per caption): first as provisional word ids, then, after :meth:`build_vocab`, as vocabulary ids.
    Captions of record ``g`` are ``caption_start[g] .. caption_start[g + 1] - 1``; caption ``c``
    spans ``token_end[c - 1] .. token_end[c]`` of ``ids``."""

    def __init__(self) -> None:
        self.words: dict[str, int] = {}
        self._ids = array("i")
        self._token_end = array("q")
        self._caption_start = array("q", [0])
        self.ids = self.token_end = self.caption_start = None
        self.vocab: Vocab | None = None

    def add(self, captions: list[list[str]]) -> None:
        words, ids = self.words, self._ids
        for toks in captions:
            ids.extend([words.setdefault(t, len(words)) for t in toks])
            self._token_end.append(len(ids))
        self._caption_start.append(len(self._token_end))

    def build_vocab(self, train: list[int], min_freq: int) -> Vocab:
        """The vocabulary of the records ``train`` (as :meth:`Vocab.build` makes it), and the ids
        turned into vocabulary ids."""
        ids = np.frombuffer(self._ids, dtype=np.int32) if len(self._ids) else np.zeros(0, np.int32)
        token_end = np.frombuffer(self._token_end, dtype=np.int64) if len(self._token_end) else np.zeros(0, np.int64)
        caption_start = np.frombuffer(self._caption_start, dtype=np.int64)
        token_start = np.concatenate([[0], token_end[:-1]]).astype(np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for g in train:  # mark the tokens of training captions
            c0, c1 = caption_start[g], caption_start[g + 1]
            if c1 > c0:
                mask[token_start[c0]:token_end[c1 - 1]] = True
        counts = np.bincount(ids[mask], minlength=len(self.words))
        itos = list(self.words)
        words = sorted((w for w, i in self.words.items() if counts[i] >= min_freq and w not in SPECIALS),
                       key=lambda w: (-int(counts[self.words[w]]), w))
        vocab = Vocab(list(SPECIALS) + words)
        lut = np.asarray([vocab.stoi.get(w, vocab.unk) for w in itos] or [0], dtype=np.int32)
        self.ids = lut[ids] if len(ids) else ids
        self.token_end, self.caption_start = token_end, caption_start
        self.token_start = token_start
        self.vocab = vocab
        del self._ids, self._token_end, self._caption_start, self.words
        return vocab

    def captions(self, g: int) -> list[np.ndarray]:
        """The vocabulary ids of each caption of record ``g``."""
        c0, c1 = int(self.caption_start[g]), int(self.caption_start[g + 1])
        return [self.ids[self.token_start[c]:self.token_end[c]] for c in range(c0, c1)]

    def encode(self, g: int, image_id: int, k: int, max_length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Record ``g``'s ``k`` training captions (see :func:`sample_captions`; cut to ``max_length``
        tokens) as rows (k, max_length + 2) of ``<start>`` tokens ``<end>`` ``<pad>``..., and their
        lengths (``<start>`` and ``<end>`` included)."""
        vocab = self.vocab
        caps = self.captions(g)
        valid = [c for c, t in enumerate(caps) if 0 < len(t) <= max_length]
        rows = np.zeros((k, max_length + 2), dtype=np.int32)  # <pad> = 0
        lengths = np.empty(k, dtype=np.int32)
        for j, c in enumerate(sample_captions(len(caps), k, seed, image_id, valid)):
            toks = caps[c][:max_length]
            rows[j, 0], rows[j, 1:len(toks) + 1], rows[j, len(toks) + 1] = vocab.start, toks, vocab.end
            lengths[j] = len(toks) + 2
        return rows, lengths


def sample_captions(n: int, k: int, seed: int, image_id: int, valid: list[int]) -> list[int]:
    """k caption indices for one image: a sample without replacement when it has k, else padded
    with repeats; deterministic per (seed, image_id) whatever the processing order."""
    rng = random.Random(f"{seed}:{image_id}")
    pool = valid or list(range(n))
    if len(pool) >= k:
        return rng.sample(pool, k)
    return pool + [rng.choice(pool) for _ in range(k - len(pool))]


def _tokenize_batch(captions: list[list[str]]) -> list[list[list[str]]]:
    return [[tokenize(c) for c in caps] for caps in captions]


def tokenize_records(records: list[Record], pool: WorkerPool | None, progress: ProgressFn | None) -> TokenTable:
    """Tokenise every caption (in ``pool`` for large sets) into a :class:`TokenTable`."""
    table = TokenTable()
    n_caps = sum(len(r.captions) for r in records)
    if pool is None or n_caps < 20000:
        for r in records:
            table.add([tokenize(c) for c in r.captions])
        return table
    batch = 512
    batches = ([r.captions for r in records[i:i + batch]] for i in range(0, len(records), batch))
    done = 0
    for toks in ordered_map(pool, _tokenize_batch, batches, (len(records) + batch - 1) // batch):
        for t in toks:
            table.add(t)
        done += len(toks)
        if progress is not None:
            progress("tokens", done, len(records))
    return table
