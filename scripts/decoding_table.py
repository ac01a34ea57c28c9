"""The decoding settings of a model side by side on one split: BLEU-4, CIDEr-D, and the share of
captions with <unk>, a repeated trigram or a dangling last word (docs/performance.md, "Decoding
defaults", was made with it).

    python scripts/decoding_table.py MODEL DATA_DIR SPLIT OUT_DIR [--beam 3]

Each setting's eval.json and captions.json go to OUT_DIR/<setting>/; the table is printed as
Markdown and saved as OUT_DIR/decoding.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from capcli.api import Captioner
from capcli.decode import DecodeOptions
from capcli.evaluate import evaluate_checkpoint
from capcli.text import DANGLING_EN

SETTINGS = [
    ("raw", "<unk> allowed, any last word, no blocking", dict(allow_unk=True, dangling=(), block_ngrams=0)),
    ("no_unk", "no <unk>", dict(dangling=(), block_ngrams=0)),
    ("no_dangling", "no <unk>, no dangling last word", dict(block_ngrams=0)),
    ("block3", "no <unk>, no dangling last word, no repeated 3-gram", dict(block_ngrams=3)),
    ("block4", "no <unk>, no dangling last word, no repeated 4-gram", dict(block_ngrams=4)),
]


def repeats_a_trigram(words: list[str]) -> bool:
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(grams) != len(set(grams))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("split")
    parser.add_argument("out", type=Path)
    parser.add_argument("--beam", type=int, default=3)
    args = parser.parse_args()
    captioner = Captioner.load(args.model, "cpu")
    rows = []
    for key, name, kw in SETTINGS:
        scores, _ = evaluate_checkpoint(captioner, torch.device("cpu"), DecodeOptions(beam_size=args.beam, **kw),
                                        data=args.data, split=args.split, meteor=False,
                                        output=args.out / key / "eval.json")
        written = json.loads((args.out / key / "captions.json").read_text())
        captions = [c["caption"].split() for c in written]
        n = max(len(captions), 1)
        rows.append({"setting": name, "bleu4": scores["bleu4"], "cider": scores["cider"],
                     "unk": sum("<unk>" in c for c in captions) / n,
                     "trigram": sum(repeats_a_trigram(c) for c in captions) / n,
                     "dangling": sum(bool(c) and c[-1] in DANGLING_EN for c in captions) / n,
                     "words": sum(map(len, captions)) / n, "images": len(captions)})
    print("| setting | BLEU-4 | CIDEr-D | with <unk> | repeated trigram | dangling last word | words |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['setting']} | {100 * r['bleu4']:.2f} | {r['cider']:.3f} | {100 * r['unk']:.1f}% | "
              f"{100 * r['trigram']:.1f}% | {100 * r['dangling']:.1f}% | {r['words']:.1f} |")
    (args.out / "decoding.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
