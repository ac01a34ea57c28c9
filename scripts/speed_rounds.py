"""Interleaved speed rounds: the paper's algorithm (../shared/seedref/seedref.py), capcli from this
checkout and, optionally, capcli from another checkout (an earlier commit), round by round in one
run, so that machine noise hits all of them alike. Prints one JSON line per measurement and a
summary of medians and ratios at the end.

    git worktree add ../base COMMIT
    python scripts/speed_rounds.py --rounds 3 --other ../base --out rounds.jsonl
    python scripts/speed_rounds.py --kinds evaluate --run runs/lite0 --data data/f8k --split val

Kinds: train_frozen (seedref frozen encoder against `benchmark train --mode cached`),
train_finetune, decode (seedref beam against `benchmark decode`), evaluate (the whole `capcli
evaluate` command of --run on --data, its split's feature cache removed first: a first evaluation).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
SEEDREF = HERE.parent / "shared" / "seedref" / "seedref.py"


def run(cmd: list[str], tree: Path | None = None) -> tuple[float, str]:
    env = {**os.environ}
    if tree is not None:  # capcli from that checkout, whatever is installed
        env["PYTHONPATH"] = str(tree)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0, done.stdout


def seedref(*args: str) -> float:
    _, out = run([sys.executable, str(SEEDREF), *args])
    row = json.loads(out.strip().splitlines()[-1])
    return row.get("samples_per_s", row.get("captions_per_s"))


def capcli(tree: Path, key: str, *args: str) -> float:
    out = Path(tempfile.mkdtemp()) / "out.json"
    run([sys.executable, "-m", "capcli", *args, "--device", "cpu", "-q", "--output", str(out)], tree)
    return json.loads(out.read_text())[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="train_frozen,train_finetune,decode,evaluate")
    ap.add_argument("--other", type=Path, help="another checkout of capcli to measure beside this one")
    ap.add_argument("--run", help="evaluate: a run dir or model")
    ap.add_argument("--data", help="evaluate: its dataset dir")
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", type=Path, default=Path("speed_rounds.jsonl"))
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    if "evaluate" in kinds and not (args.run and args.data):
        sys.exit("evaluate needs --run and --data")
    trees = {"this": HERE, **({"other": args.other.resolve()} if args.other else {})}
    rows = []

    def emit(**row) -> None:
        row["load_1m"] = round(os.getloadavg()[0], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    for r in range(1, args.rounds + 1):
        if "train_frozen" in kinds:
            emit(round=r, kind="train_frozen", who="seed",
                 value=seedref("train", "--encoder", "convnext_tiny", "--batch", "16", "--steps", "3"))
            for who, tree in trees.items():
                emit(round=r, kind="train_frozen", who=who, value=capcli(
                    tree, "samples_per_s", "benchmark", "train", "--encoder", "convnext_tiny", "--image-size", "224",
                    "--batch", "16", "--mode", "cached", "--steps", "5"))
        if "train_finetune" in kinds:
            emit(round=r, kind="train_finetune", who="seed",
                 value=seedref("train", "--encoder", "convnext_tiny", "--batch", "16", "--steps", "3", "--finetune"))
            for who, tree in trees.items():
                emit(round=r, kind="train_finetune", who=who, value=capcli(
                    tree, "samples_per_s", "benchmark", "train", "--encoder", "convnext_tiny", "--image-size", "224",
                    "--batch", "16", "--mode", "finetune", "--steps", "3"))
        if "decode" in kinds:
            emit(round=r, kind="decode", who="seed", value=seedref(
                "beam", "--encoder", "convnext_atto", "--images", "10", "--beam", "5", "--max-len", "50",
                "--vocab", "1000"))
            for who, tree in trees.items():
                emit(round=r, kind="decode", who=who, value=capcli(
                    tree, "captions_per_s", "benchmark", "decode", "--encoder", "convnext_atto", "--beam", "5",
                    "--images", "40", "--max-length", "50", "--vocab", "1000"))
        if "evaluate" in kinds:
            for who, tree in trees.items():
                for cache in glob.glob(f"{args.data}/features/*/{args.split}.h5"):
                    os.unlink(cache)  # a first evaluation: the split's feature cache is made
                out = Path(tempfile.mkdtemp()) / "eval.json"
                seconds, _ = run([sys.executable, "-m", "capcli", "evaluate", args.run, "--data", args.data,
                                  "--split", args.split, "--beam", "3", "--no-meteor", "--device", "cpu", "-q",
                                  "--output", str(out)], tree)
                emit(round=r, kind="evaluate", who=who, value=round(seconds, 2),
                     bleu4=json.loads(out.read_text())["bleu4"])

    print("\nmedians (train: pairs/s, decode: captions/s, evaluate: seconds of the whole command)")
    for kind in kinds:
        med = {who: statistics.median(x["value"] for x in rows if x["kind"] == kind and x["who"] == who)
               for who in ("seed", *trees) if any(x["kind"] == kind and x["who"] == who for x in rows)}
        line = ", ".join(f"{who} {v:.2f}" for who, v in med.items())
        if "seed" in med:
            line += " | vs seed: " + ", ".join(f"{who} {v / med['seed']:.2f}x" for who, v in med.items() if who != "seed")
        print(f"{kind}: {line}")


if __name__ == "__main__":
    main()
