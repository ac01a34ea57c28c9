"""Tests of capcli.metrics and capcli.text: hand-computed values, and agreement with pycocoevalcap."""

from __future__ import annotations

import math
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import sacrebleu
import torch

from capcli import metrics
from capcli.errors import UserError
from capcli.metrics import caption_scores, top5_accuracy, topk_correct
from capcli.text import tokenize


def scores(refs, hyps):
    return caption_scores(refs, hyps, meteor=False)


# ---------------------------------------------------------------------------------------------
# tokenizer

@pytest.mark.parametrize("text, tokens", [
    ("A Dog's toy.", ["a", "dog", "'s", "toy"]),
    ("Don't stop, now!", ["do", "n't", "stop", "now"]),
    ("A man riding a wave on top of a surfboard.",
     ["a", "man", "riding", "a", "wave", "on", "top", "of", "a", "surfboard"]),
    ("It's a black-and-white photo of a t-shirt.",
     ["it", "'s", "a", "black-and-white", "photo", "of", "a", "t-shirt"]),
    ("They're at St. Mark's at 10:30 a.m. in the U.S.",
     ["they", "'re", "at", "st.", "mark", "'s", "at", "10:30", "a.m.", "in", "the", "u.s."]),
    ("A sign that says \"stop\" and 'no parking' (really)",
     ["a", "sign", "that", "says", "stop", "and", "no", "parking", "really"]),
    ("I cannot, I won't; gonna -- maybe... 3.5 $5 50%",
     ["i", "can", "not", "i", "wo", "n't", "gon", "na", "maybe", "3.5", "$", "5", "50", "%"]),
    ("two dogs' toys in the '90s", ["two", "dogs", "toys", "in", "the", "'90s"]),
    ("It\u2019s curly", ["it", "'s", "curly"]),
    ("", []),
    ("  ...  ", []),
])
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


# Captions on which the tokenizer must agree with COCO's own pipeline (Stanford PTBTokenizer of
# CoreNLP 3.4.1, then removal of COCO's punctuation list). Brackets are left out: COCO keeps them
# as "-lrb-" tokens by accident, capcli drops them (see capcli/text.py).
PTB_SAMPLES = """A Dog's toy.
Don't stop, now!
A man riding a wave on top of a surfboard.
Two dogs' toys are on the floor
It's a black-and-white photo of a t-shirt.
A 3.5 inch screen and 10:30 clock, $5 for 50% off.
can't won't cannot gonna wanna I'm they're we've you'll he'd She'D
A sign that says "stop" and 'no parking'
The U.S. flag near Mr. Smith's house etc.
Wait... what? -- yes - no; maybe:
hot-dog  with   double  spaces
It\u2019s a curly apostrophe test
A 1990's car and the '90s
lots of punctuation,,,here..
a b/w photo 2/3 of 1,000 people 3-4 kids
"Quoted start" and end."
Mr. Smith and Dr. Who on St. Mark's at 5 p.m. vs. 6 a.m.
A dog. A cat
ft. No. 5 and approx. 3 ft
a 2nd place 4x4 truck at o'clock
TWO MEN PLAYING FRISBEE
A person's bike, a bus's door
a man,woman and child
a dog.The cat
I'd've shouldn't've
the cat's-eye marble
Plan B. at 10:30pm for 1,000s of x-rays
field., dog.; cat.: sun
Miss Smith said no. miss it
Wash. the car, then wash it.
a man holding a frisbee in his hand .
A large jetliner sitting on top of an airport runway.
Several people standing around a kitchen counter with food on it
A close up of a plate of food with broccoli
the Pizza's  crust is   burned""".split("\n")


def test_tokenize_matches_coco_ptb_tokenizer(tmp_path):
    """Run COCO's own tokenizer (Java) on the samples and compare; skipped without Java/jar."""
    pytest.importorskip("pycocoevalcap")
    import pycocoevalcap

    # pycocoevalcap is a namespace package (no __init__.py): use its __path__, not __file__.
    jar = Path(list(pycocoevalcap.__path__)[0]) / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if shutil.which("java") is None or not jar.is_file():
        pytest.skip("needs Java and pycocoevalcap's stanford-corenlp jar")
    src = tmp_path / "captions.txt"
    src.write_text("\n".join(PTB_SAMPLES), encoding="utf-8")
    out = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                          "-preserveLines", "-lowerCase", str(src)],
                         capture_output=True, text=True, encoding="utf-8", timeout=60)
    lines = out.stdout.split("\n")
    coco_punct = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                  "-", "--", "...", ";"}
    for sample, line in zip(PTB_SAMPLES, lines):
        expected = [w for w in line.rstrip().split(" ") if w and w not in coco_punct]
        assert tokenize(sample) == expected, sample
    assert len(lines) >= len(PTB_SAMPLES)


# ---------------------------------------------------------------------------------------------
# BLEU

def test_bleu_identical_is_one():
    ref = "A man is riding a brown horse along the beach at sunset"
    s = scores({"1": [ref, "a horse on a beach"]}, {"1": ref})
    for n in (1, 2, 3, 4):
        assert s[f"bleu{n}"] == pytest.approx(1.0, abs=1e-8)


def test_bleu_worked_example():
    refs = ["the cat is on the mat", "there is a cat on the mat"]     # lengths 6 and 7
    # Image 1: hypothesis "the the the cat on mat" (6 words; closest reference length 6: no penalty)
    #   unigrams: "the" x3 clipped to 2 (its most in one reference), cat, on, mat -> 5 / 6
    #   bigrams:  "the the" x2 (0), "the cat" (1), "cat on" (1, 2nd ref), "on mat" (0) -> 2 / 5
    #   BLEU-1 = 5/6 ; BLEU-2 = sqrt(5/6 * 2/5) = sqrt(1/3)
    s = scores({"1": refs}, {"1": "The the the cat on mat."})
    assert s["bleu1"] == pytest.approx(5 / 6, abs=1e-8)
    assert s["bleu2"] == pytest.approx(math.sqrt(1 / 3), abs=1e-8)
    # Image 2: hypothesis "the cat on mat" (4 words; closest reference length 6)
    #   unigrams 4/4 ; bigrams "the cat", "cat on" match, "on mat" not -> 2/3
    #   brevity penalty exp(1 - 6/4) = exp(-0.5) = 0.60653
    #   BLEU-1 = exp(-0.5) = 0.606531 ; BLEU-2 = sqrt(2/3) * exp(-0.5) = 0.816497 * 0.606531 = 0.495230
    s = scores({"2": refs}, {"2": "the cat on mat"})
    assert s["bleu1"] == pytest.approx(math.exp(-0.5), abs=1e-8)
    assert s["bleu2"] == pytest.approx(math.sqrt(2 / 3) * math.exp(-0.5), abs=1e-8)
    assert s["bleu2"] == pytest.approx(0.495230, abs=1e-6)
    # Both images as one corpus: counts are summed, not scores averaged.
    #   p1 = (5+4)/(6+4) = 0.9 ; p2 = (2+2)/(5+3) = 0.5 ; c = 10, r = 6+6 = 12 -> BP = exp(-0.2)
    #   BLEU-1 = 0.9 exp(-0.2) = 0.736872 ; BLEU-2 = sqrt(0.45) exp(-0.2) = 0.549222
    s = scores({"1": refs, "2": refs}, {"1": "the the the cat on mat", "2": "the cat on mat"})
    assert s["bleu1"] == pytest.approx(0.9 * math.exp(-0.2), abs=1e-8)
    assert s["bleu2"] == pytest.approx(math.sqrt(0.45) * math.exp(-0.2), abs=1e-8)
    assert s["bleu2"] == pytest.approx(0.549222, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# ROUGE-L

def test_rouge_l_known_pair():
    # LCS("the cat on mat", "the cat is on the mat") = 4 ("the cat on mat")
    # P = 4/4 = 1, R = 4/6 ; F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * (2/3) / (2/3 + 1.44)
    s = scores({"1": ["The cat is on the mat."]}, {"1": "the cat on mat"})
    expected = 2.44 * (2 / 3) / (2 / 3 + 1.44)
    assert s["rouge_l"] == pytest.approx(expected, abs=1e-12)
    assert s["rouge_l"] == pytest.approx(0.772152, abs=1e-6)
    # A second, worse reference changes nothing: the best precision and recall are kept.
    s = scores({"1": ["The cat is on the mat.", "dogs everywhere"]}, {"1": "the cat on mat"})
    assert s["rouge_l"] == pytest.approx(expected, abs=1e-12)


def test_lcs_matches_dynamic_programming():
    def lcs_dp(a, b):
        row = [0] * (len(b) + 1)
        for x in a:
            prev = 0
            for j, y in enumerate(b):
                cur = row[j + 1]
                row[j + 1] = prev + 1 if x == y else max(row[j + 1], row[j])
                prev = cur
        return row[-1]

    rng = random.Random(3)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 80))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 80))]
        assert metrics._lcs_length(a, b) == lcs_dp(a, b)


# ---------------------------------------------------------------------------------------------
# CIDEr-D

def test_cider_identical_and_disjoint():
    refs = {"1": ["a brown dog runs across green grass"] * 3,
            "2": ["two kids fly a red kite"] * 2,
            "3": ["an old man reads the newspaper"]}
    # Every n-gram order has weight, so the cosine is 1 for n = 1..4, no length penalty: 10.
    assert scores(refs, {k: v[0] for k, v in refs.items()})["cider"] == pytest.approx(10.0, abs=1e-9)
    disjoint = {k: "purple elephants juggling teapots" for k in refs}
    assert scores(refs, disjoint)["cider"] == 0.0


def test_cider_worked_example():
    # Two images, so every n-gram weighs tf * (log 2 - log df); write L = log 2.
    # "a" is in both images' references (df 2): weight 0. Everything else weighs L.
    # Image A, hyp "a red bus" vs "a red car":
    #   n=1: h = {a:0, red:L, bus:L}, r = {a:0, red:L, car:L}: L^2 / (sqrt2 L * sqrt2 L) = 0.5
    #   n=2: {a red, red bus} vs {a red, red car}: 0.5 ; n=3: 0 ; n=4: no 4-grams: 0
    #   same length, no penalty: 10 * (0.5 + 0.5 + 0 + 0) / 4 = 2.5
    # Image B, hyp equal to its reference "a blue bus": 1, 1, 1, 0 -> 7.5
    # CIDEr-D = mean(2.5, 7.5) = 5.0
    refs = {"A": ["a red car"], "B": ["a blue bus"]}
    s = scores(refs, {"A": "a red bus", "B": "A blue bus."})
    assert s["cider"] == pytest.approx(5.0, abs=1e-9)


def test_cider_uses_only_scored_images():
    refs = {"1": ["a dog on grass"], "2": ["a cat on a bed"], "3": ["a bird in a tree"]}
    hyps = {"1": "a dog on a bed", "2": "a cat on grass"}
    full = scores(refs, hyps)
    only = scores({k: refs[k] for k in hyps}, hyps)
    for key in ("bleu1", "bleu4", "rouge_l", "cider", "sacrebleu"):
        assert full[key] == only[key]


# ---------------------------------------------------------------------------------------------
# inputs, sacreBLEU, METEOR

def test_missing_reference_key_raises():
    with pytest.raises(ValueError, match="no references"):
        scores({"1": ["a dog"]}, {"1": "a dog", "2": "a cat"})
    with pytest.raises(ValueError):
        scores({"1": ["a dog"]}, {})


def test_empty_hypotheses_score_zero():
    refs = {"1": ["a dog on the grass"], "2": ["a cat on a bed"]}
    s = scores(refs, {"1": "", "2": "..."})
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "sacrebleu"):
        assert s[key] == pytest.approx(0.0, abs=1e-9), key
    s = scores(refs, {"1": "", "2": "a cat on a bed"})
    assert 0 < s["bleu1"] < 1 and s["cider"] > 0


def test_sacrebleu_matches_package():
    refs = {"a": ["A man rides a horse.", "A person on a horse!", "Someone riding."],
            "b": ["Two dogs play in the snow."],
            "c": ["A red bus on a city street.", "A bus drives down the road."]}
    hyps = {"a": "A man riding a horse.", "b": "Two dogs playing in snow.", "c": "A red bus on the street."}
    s = scores(refs, hyps)
    streams = [[refs[k][i] if i < len(refs[k]) else None for k in hyps] for i in range(3)]
    expected = sacrebleu.corpus_bleu(list(hyps.values()), streams)
    assert s["sacrebleu"] == pytest.approx(expected.score, abs=1e-9)
    assert 0 < s["sacrebleu"] <= 100
    assert "tok:13a" in s["sacrebleu_signature"] and "nrefs:var" in s["sacrebleu_signature"]


def test_scores_shape_and_ranges():
    refs = {"1": ["A dog runs on the grass.", "A brown dog running."], "2": ["A cat sleeps."]}
    s = scores(refs, {"1": "A dog running on grass", "2": "a cat is sleeping"})
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert isinstance(s[key], float) and 0 <= s[key] <= 1
    assert s["bleu1"] >= s["bleu2"] >= s["bleu3"] >= s["bleu4"]
    assert isinstance(s["cider"], float) and s["cider"] >= 0
    assert s["meteor"] is None and s["meteor_skipped"]


def test_meteor_required_but_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv(metrics.METEOR_JAR_ENV, str(tmp_path / "missing.jar"))
    refs, hyps = {"1": ["a dog"]}, {"1": "a dog"}
    with pytest.raises(UserError, match="METEOR"):
        caption_scores(refs, hyps, meteor=True)
    s = caption_scores(refs, hyps)                      # auto: skipped, with the reason
    assert s["meteor"] is None and metrics.METEOR_JAR_ENV in s["meteor_skipped"]


def test_meteor_broken_jar_is_reported_not_fatal(monkeypatch, tmp_path):
    if not metrics._java_status()[0]:
        pytest.skip("needs Java")
    fake = tmp_path / "meteor-1.5.jar"
    fake.write_bytes(b"not a jar")
    monkeypatch.setenv(metrics.METEOR_JAR_ENV, str(fake))
    refs, hyps = {"1": ["a dog"]}, {"1": "a dog"}
    s = caption_scores(refs, hyps)
    assert s["meteor"] is None and "METEOR" in s["meteor_skipped"]
    with pytest.raises(UserError):
        caption_scores(refs, hyps, meteor=True)


def test_meteor_never_hangs():
    ok, reason = metrics.meteor_available()
    if not ok:
        pytest.skip(f"METEOR unavailable here: {reason}")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="no answer"):
        metrics.meteor_score({"1": ["a dog"]}, {"1": "a dog"}, timeout_s=0.3)
    assert time.monotonic() - start < 5


@pytest.fixture(scope="module")
def auto_meteor_scores():
    """One auto-METEOR run shared by two tests: where Java and the jar exist this starts the jar
    once, which loads its paraphrase tables (about 10 s, most of this file's time)."""
    refs = {"1": ["A man is riding a brown horse along the beach at sunset."],
            "2": ["Two young children fly a red kite in a park."]}
    return caption_scores(refs, {k: v[0] for k, v in refs.items()})


@pytest.mark.slow
def test_meteor_float_or_skipped(auto_meteor_scores):
    s = auto_meteor_scores
    if s["meteor"] is None:
        assert isinstance(s["meteor_skipped"], str) and s["meteor_skipped"]
    else:
        assert isinstance(s["meteor"], float) and 0 <= s["meteor"] <= 1
        assert "meteor_skipped" not in s


@pytest.mark.slow
def test_meteor_identical_is_high(auto_meteor_scores):
    ok, reason = metrics.meteor_available()
    if not ok:
        pytest.skip(f"METEOR unavailable here: {reason}")
    assert auto_meteor_scores["meteor"] > 0.9


# ---------------------------------------------------------------------------------------------
# agreement with COCO's own scorers

WORDS = ("a an the man woman dog dogs cat on in with of red blue white sitting riding standing "
         "next to table street horse beach two people grass").split()


def _random_corpus(rng: random.Random):
    def sentence(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    n = rng.randint(1, 25)
    refs = {f"img{i}": [sentence(1, 14) for _ in range(rng.randint(1, 6))] for i in range(n)}
    hyps = {}
    for key, rs in refs.items():
        r = rng.random()
        if r < 0.1:
            hyps[key] = ""                                   # empty hypothesis
        elif r < 0.2:
            hyps[key] = rng.choice(rs)                       # equal to a reference
        elif r < 0.3:
            hyps[key] = " ".join([rng.choice(WORDS)] * rng.randint(1, 6))   # repeated word
        elif r < 0.45:
            hyps[key] = sentence(1, 3)                       # very short
        else:
            hyps[key] = sentence(4, 18)
    # Some raw-text noise the tokenizer must remove before COCO's scorers see the text.
    hyps = {k: (h.capitalize() + "." if h and rng.random() < 0.5 else h) for k, h in hyps.items()}
    return refs, hyps


def test_agrees_with_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    rng = random.Random(1234)
    worst = 0.0
    for _ in range(40):
        refs, hyps = _random_corpus(rng)
        ours = scores(refs, hyps)
        gts = {k: [" ".join(tokenize(r)) for r in refs[k]] for k in hyps}
        res = {k: [" ".join(tokenize(h))] for k, h in hyps.items()}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, _ = Cider().compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        for n in range(4):
            assert ours[f"bleu{n + 1}"] == pytest.approx(bleu[n], abs=1e-6)
            worst = max(worst, abs(ours[f"bleu{n + 1}"] - bleu[n]))
        assert ours["cider"] == pytest.approx(cider, abs=1e-6)
        assert ours["rouge_l"] == pytest.approx(rouge, abs=1e-6)
        worst = max(worst, abs(ours["cider"] - cider), abs(ours["rouge_l"] - rouge))
    assert worst < 1e-6


# ---------------------------------------------------------------------------------------------
# top-k accuracy

def test_top5_accuracy_hand_built():
    # One caption, 3 steps, vocabulary of 7. Logits rank the words 0 > 1 > ... > 6 at every step.
    logits = torch.tensor([[[7.0, 6, 5, 4, 3, 2, 1]] * 3])                 # (1, 3, 7)
    targets = torch.tensor([[4, 5, 6]])       # ranks 5 (in top 5), 6 (out), 7 (out, but masked)
    mask = torch.tensor([[True, True, False]])
    assert topk_correct(logits, targets, mask, k=5) == (1, 2)
    assert top5_accuracy(logits, targets, mask) == pytest.approx(0.5)
    assert topk_correct(logits, targets, mask, k=1) == (0, 2)
    assert topk_correct(logits, targets, torch.ones(1, 3, dtype=torch.bool), k=7) == (3, 3)
    assert top5_accuracy(logits, targets, torch.zeros(1, 3, dtype=torch.bool)) == 0.0
    with pytest.raises(ValueError):
        topk_correct(logits, targets[:, :2], mask)


def test_topk_accumulates_across_batches():
    torch.manual_seed(0)
    logits = torch.randn(6, 9, 50)
    targets = torch.randint(0, 50, (6, 9))
    mask = torch.rand(6, 9) > 0.3
    c1, t1 = topk_correct(logits[:3], targets[:3], mask[:3])
    c2, t2 = topk_correct(logits[3:], targets[3:], mask[3:])
    assert (c1 + c2) / (t1 + t2) == pytest.approx(top5_accuracy(logits, targets, mask))
    top5 = logits.topk(5, dim=-1).indices
    expected = ((top5 == targets[..., None]).any(-1) & mask).sum().item() / mask.sum().item()
    assert top5_accuracy(logits, targets, mask) == pytest.approx(expected)
