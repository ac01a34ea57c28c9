"""Caption tokenisation shared by the vocabulary and the metrics.

It follows what the COCO caption evaluation does with its PTB tokenizer: lower-case, split off
punctuation and clitics ("dog's" -> "dog 's", "don't" -> "do n't"), then drop the punctuation
tokens. Vocabulary tokens and evaluation references are therefore made by the same function.
"""

from __future__ import annotations

import re

# Tokens that COCO's evaluation removes after PTB tokenisation.
PUNCTUATION = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":",
               "-", "--", "...", ";", "(", ")", "[", "]", "{", "}", '"'}

_CLITICS = re.compile(r"(?i)\b(\w+)(n't)\b|\b(\w+)('s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'[a-z]+|[a-z0-9]+(?:[./][a-z0-9]+)*|[^\sa-z0-9]", re.IGNORECASE)


def _split_clitic(match: re.Match) -> str:
    if match.group(2):
        return f"{match.group(1)} {match.group(2)}"
    return f"{match.group(3)} {match.group(4)}"


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` with punctuation removed, as COCO evaluation sees them."""
    text = _CLITICS.sub(_split_clitic, text.lower().replace("\u2019", "'"))
    return [t for t in _TOKEN.findall(text) if t not in PUNCTUATION]
