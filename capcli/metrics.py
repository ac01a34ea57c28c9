"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as the COCO caption evaluation computes
them, corpus BLEU from sacreBLEU, and top-k accuracy of next-word logits.

``caption_scores`` takes raw strings, tokenises them with :func:`capcli.text.tokenize` (COCO's PTB
tokenisation and punctuation removal) and returns the numbers COCO's evaluation code
(pycocoevalcap) reports for the same captions:

- BLEU-n: corpus level; n-gram counts clipped to the largest count in any one reference; the
  reference length used for the brevity penalty is, per image, the one closest to the hypothesis
  length (the shorter on a tie); precisions carry the same 1e-15 / 1e-9 guards against zero.
- ROUGE-L: per image, the LCS with every reference; the largest precision and the largest recall
  over the references combine into F with beta = 1.2; the mean over images.
- CIDEr-D: 1- to 4-gram tf-idf vectors whose document frequencies come from the references of the
  images scored; per n, hypothesis weights clipped to the reference's, cosine-normalised, times a
  Gaussian length penalty (sigma 6); averaged over n and references, times 10; mean over images.
- METEOR: the meteor-1.5 jar, run on the tokenised captions when Java and the jar are found.

Everything here is pure: nothing prints, nothing is cached on disk.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import queue
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

from capcli.errors import UserError
from capcli.text import tokenize

__all__ = ["caption_scores", "bleu", "rouge_l", "cider_d", "CiderD", "meteor_available", "meteor_score",
           "MeteorProcess", "start_meteor",
           "topk_correct", "top5_accuracy"]

_Ngram = tuple[str, ...]

# ---------------------------------------------------------------------------------------------
# n-grams

def _ngram_counts(tokens: Sequence[str], n: int) -> Counter[_Ngram]:
    """Counts of every 1- to n-gram of ``tokens``."""
    tokens = list(tokens)
    counts: Counter[_Ngram] = Counter()
    for k in range(1, n + 1):
        counts.update(zip(*(tokens[i:] for i in range(k))))
    return counts


def _count_all(references: Mapping[str, Sequence[Sequence[str]]], hypotheses: Mapping[str, Sequence[str]],
               n: int) -> tuple[dict, dict]:
    """(key -> (length, counts) of the hypothesis, key -> [(length, counts) of each reference])."""
    hyp = {k: (len(h), _ngram_counts(h, n)) for k, h in hypotheses.items()}
    refs = {k: [(len(r), _ngram_counts(r, n)) for r in references[k]] for k in hypotheses}
    return hyp, refs


# ---------------------------------------------------------------------------------------------
# BLEU


def bleu(references: Mapping[str, Sequence[Sequence[str]]], hypotheses: Mapping[str, Sequence[str]],
         n: int = 4) -> list[float]:
    """Corpus BLEU-1..``n`` of tokenised ``hypotheses`` against tokenised ``references`` (COCO's way).

    Papineni et al. (2002): ``BP * exp(mean_k log p_k)`` where ``p_k`` is the corpus-level clipped
    k-gram precision. As in the COCO evaluation, the effective reference length is the sum over
    images of the reference length closest to the hypothesis length (the shorter on a tie), and the
    precisions are ``(correct + 1e-15) / (guessed + 1e-9)``, so an order with nothing guessed
    scores 0, not NaN.
    """
    return _bleu(*_count_all(references, hypotheses, n), n)


def _bleu(hyp_counts: dict, ref_counts: dict, n: int) -> list[float]:
    tiny, small = 1e-15, 1e-9
    hyp_len = ref_len = 0
    guessed = [0] * n
    correct = [0] * n
    for key, (length, counts) in hyp_counts.items():
        refs = ref_counts[key]
        max_ref: dict[_Ngram, int] = {}
        for _, ref in refs:
            for gram, count in ref.items():
                if count > max_ref.get(gram, 0):
                    max_ref[gram] = count
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(count, max_ref.get(gram, 0))
        for k in range(n):
            guessed[k] += max(0, length - k)
        hyp_len += length
        ref_len += min((abs(r_len - length), r_len) for r_len, _ in refs)[1]

    scores = []
    product = 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guessed[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1:
        brevity = math.exp(1 - 1 / ratio)
        scores = [s * brevity for s in scores]
    return scores


# ---------------------------------------------------------------------------------------------
# ROUGE-L


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b``.

    Bit-parallel (Allison & Dix 1986, in Hyyro's 2004 form): after reading a prefix of ``b``, the
    zero bits of ``v`` mark the positions of ``a`` where the LCS with that prefix steps up.
    """
    if not a or not b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(references: Mapping[str, Sequence[Sequence[str]]], hypotheses: Mapping[str, Sequence[str]],
            beta: float = 1.2) -> float:
    """Mean over images of ROUGE-L F (Lin 2004) with ``beta`` = 1.2, as COCO's evaluation computes it.

    Per image: the largest LCS-precision and the largest LCS-recall over the references (each
    maximised on its own), then ``F = (1 + beta^2) P R / (R + beta^2 P)``; 0 when either is 0.
    """
    total = 0.0
    for key, hyp in hypotheses.items():
        best_p = best_r = 0.0
        for ref in references[key]:
            lcs = _lcs_length(ref, hyp)
            if lcs:
                best_p = max(best_p, lcs / len(hyp))
                best_r = max(best_r, lcs / len(ref))
        if best_p and best_r:
            total += (1 + beta ** 2) * best_p * best_r / (best_r + beta ** 2 * best_p)
    return total / len(hypotheses) if hypotheses else 0.0


# ---------------------------------------------------------------------------------------------
# CIDEr-D


def cider_d(references: Mapping[str, Sequence[Sequence[str]]], hypotheses: Mapping[str, Sequence[str]],
            n: int = 4, sigma: float = 6.0, per_image: bool = False) -> float | dict[str, float]:
    """Mean over images of CIDEr-D (Vedantam et al. 2015) as COCO's evaluation computes it (or,
    with ``per_image``, each image's score by key).

    Document frequencies and ``log(#images)`` come from the references of the images scored (the
    keys of ``hypotheses``). Each n-gram weighs ``tf * (log(#images) - log(max(1, df)))``. Per n:
    ``sum_g min(h_g, r_g) * r_g / (|h| |r|)`` times ``exp(-(l_h - l_r)^2 / (2 sigma^2))``, averaged
    over n and over references, times 10. As in COCO's code the lengths ``l`` in the penalty are
    counted in bigrams (``max(0, words - 1)``).
    """
    hyp_counts, ref_counts = _count_all(references, hypotheses, n)
    if per_image:
        scorer = CiderD(ref_counts, n, sigma)
        return {key: scorer.score_counts(key, counts) for key, (_, counts) in hyp_counts.items()}
    return _cider(hyp_counts, ref_counts, n, sigma)


def _cider(hyp_counts: dict, ref_counts: dict, n: int, sigma: float = 6.0) -> float:
    if not hyp_counts:
        return 0.0
    scorer = CiderD({k: ref_counts[k] for k in hyp_counts}, n, sigma)
    return sum(scorer.score_counts(key, counts) for key, (_, counts) in hyp_counts.items()) / len(hyp_counts)


class CiderD:
    """CIDEr-D against fixed document frequencies: those of ``ref_counts`` (key -> the (length,
    n-gram counts) of each reference of an image), e.g. a whole training split. Scores one
    hypothesis at a time, the reference side of each image vectorised once and kept: the reward of
    self-critical training, fast enough to score every sampled caption of every step.

    With ``ref_counts`` holding exactly the images scored, :meth:`score_counts` is the per-image
    CIDEr-D of :func:`cider_d` and :func:`caption_scores` (the same arithmetic, in the same order).
    """

    def __init__(self, ref_counts: Mapping, n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.ref_counts = ref_counts
        doc_freq: Counter[_Ngram] = Counter()
        for refs in ref_counts.values():
            doc_freq.update({gram for _, counts in refs for gram in counts})
        self.log_images = math.log(float(max(len(ref_counts), 1)))
        # idf of every n-gram seen in a reference; unseen ones count as df = 1 (idf = log_images).
        self.idf = {gram: self.log_images - math.log(max(1.0, df)) for gram, df in doc_freq.items()}
        self._refs: dict = {}

    @classmethod
    def from_references(cls, references: Mapping[str, Sequence[str]], n: int = 4, sigma: float = 6.0,
                        end: str | None = None) -> "CiderD":
        """From raw reference strings (key -> captions), tokenised as :func:`caption_scores` does;
        with ``end`` (a token no caption contains) that token closes every reference, so that a
        hypothesis scored with it closed too earns the n-grams of how references end (a caption
        that stops on "with a" matches none)."""
        close = [end] if end is not None else []
        return cls({k: [(len(t), _ngram_counts(t + close, n)) for t in (tokenize(r) for r in refs)]
                    for k, refs in references.items()}, n, sigma)

    def _vectorise(self, counts: Counter[_Ngram]) -> tuple[list[dict[_Ngram, float]], list[float], int]:
        n, idf, log_images = self.n, self.idf, self.log_images
        vec: list[dict[_Ngram, float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        bigrams = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            weight = float(tf) * idf.get(gram, log_images)
            vec[k][gram] = weight
            norm[k] += weight ** 2
            if k == 1:
                bigrams += tf
        return vec, [math.sqrt(x) for x in norm], bigrams

    def _ref_vectors(self, key) -> list:
        got = self._refs.get(key)
        if got is None:
            got = self._refs[key] = [self._vectorise(r_counts) for _, r_counts in self.ref_counts[key]]
        return got

    def score_counts(self, key, counts: Counter[_Ngram]) -> float:
        """CIDEr-D (x10) of a hypothesis, given as its n-gram counts, against image ``key``'s references."""
        n = self.n
        h_vec, h_norm, h_len = self._vectorise(counts)
        refs = self._ref_vectors(key)
        score = [0.0] * n
        for r_vec, r_norm, r_len in refs:
            penalty = math.e ** (-(float(h_len - r_len) ** 2) / (2 * self.sigma ** 2))
            for k in range(n):
                r_k = r_vec[k]
                val = 0.0
                for gram, weight in h_vec[k].items():
                    ref_weight = r_k.get(gram, 0.0)
                    val += min(weight, ref_weight) * ref_weight
                if h_norm[k] != 0 and r_norm[k] != 0:
                    val /= h_norm[k] * r_norm[k]
                score[k] += val * penalty
        return sum(score) / n / len(refs) * 10.0

    def score(self, key, tokens: Sequence[str]) -> float:
        """CIDEr-D (x10) of tokenised ``tokens`` against image ``key``'s references."""
        return self.score_counts(key, _ngram_counts(tokens, self.n))


# ---------------------------------------------------------------------------------------------
# METEOR (the meteor-1.5 jar, as COCO's evaluation runs it)

METEOR_JAR_ENV = "CAPCLI_METEOR_JAR"
_METEOR_TIMEOUT_S = 120.0        # per call, on top of a per-image allowance


@functools.lru_cache(maxsize=1)
def _java_status() -> tuple[str | None, str]:
    """(path to java, "") when a working Java runtime is found, else (None, reason). Checked once."""
    java = shutil.which("java")
    if java is None:
        return None, "no Java runtime found (install a JRE, e.g. `apt-get install default-jre`)"
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"`java -version` failed ({type(exc).__name__})"
    if proc.returncode != 0:
        return None, f"`java -version` exited with status {proc.returncode}"
    return java, ""


def _find_meteor_jar() -> tuple[Path | None, str]:
    env = os.environ.get(METEOR_JAR_ENV)
    if env:
        path = Path(env).expanduser()
        if path.is_file():
            return path, ""
        return None, f"{METEOR_JAR_ENV}={env} is not a file"
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            path = Path(base) / "meteor" / "meteor-1.5.jar"
            if path.is_file():
                return path, ""
    return None, (f"meteor-1.5.jar not found (pip install pycocoevalcap, or set {METEOR_JAR_ENV} "
                  "to the jar)")


def meteor_available() -> tuple[bool, str]:
    """(True, "") when METEOR can run here, else (False, a one-line reason)."""
    java, reason = _java_status()
    if java is None:
        return False, reason
    jar, reason = _find_meteor_jar()
    if jar is None:
        return False, reason
    return True, ""


class _MeteorError(RuntimeError):
    pass


class MeteorProcess:
    """The meteor-1.5 jar as a running process, started ahead of need: the JVM start and the
    loading of METEOR's paraphrase tables take about ten seconds, which then overlap with whatever
    the caller does meanwhile (decoding the captions to score). :meth:`score` once, then close.

    Talks the jar's ``-stdio`` protocol: one ``SCORE ||| ref ||| ... ||| hyp`` line per image
    returns that image's statistics, then one ``EVAL ||| stats ||| ...`` line returns a score
    per image and the corpus score. The exchange runs under a deadline; a jar that stalls or dies
    is killed and reported as an error.
    """

    def __init__(self):
        ok, reason = meteor_available()
        if not ok:
            raise _MeteorError(reason)
        java, _ = _java_status()
        jar, _ = _find_meteor_jar()
        assert java is not None and jar is not None
        cmd = [java, "-jar", "-Xmx2G", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
        try:
            self.proc = subprocess.Popen(cmd, cwd=str(jar.parent), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1)
        except OSError as exc:
            raise _MeteorError(f"could not start Java for METEOR ({exc})") from None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr_tail: list[str] = []
        for target in (self._read_stdout, self._drain_stderr):
            threading.Thread(target=target, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_tail[:] = (self.stderr_tail + [line.strip()])[-5:]

    def _write(self, text: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(text)
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass  # the process died; the reader reports it

    def score(self, references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str],
              timeout_s: float | None = None) -> float:
        """Corpus METEOR of tokenised, space-joined captions (key -> references, key -> hypothesis)."""
        if not hypotheses:
            return 0.0
        if timeout_s is None:
            timeout_s = _METEOR_TIMEOUT_S + 0.02 * len(hypotheses)

        def clean(s: str) -> str:
            return " ".join(s.replace("|||", " ").split())

        score_lines = [f"SCORE ||| {' ||| '.join(clean(r) for r in references[key])} ||| {clean(hyp)}\n"
                       for key, hyp in hypotheses.items()]
        deadline = time.monotonic() + timeout_s

        def next_line() -> str:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise _MeteorError(f"METEOR gave no answer within {timeout_s:.0f} s") from None
            if line is None:
                detail = f": {self.stderr_tail[-1]}" if self.stderr_tail else ""
                raise _MeteorError(f"METEOR stopped early (exit status {self.proc.poll()}){detail}")
            return line.strip()

        writer = threading.Thread(target=self._write, args=("".join(score_lines),), daemon=True)
        writer.start()
        try:
            stats = [next_line() for _ in score_lines]
            writer.join(timeout=max(deadline - time.monotonic(), 0.001))
            self._write("EVAL ||| " + " ||| ".join(stats) + "\n")
            for _ in score_lines:
                next_line()  # per-image scores
            try:
                return float(next_line())
            except ValueError as exc:
                raise _MeteorError(f"METEOR answered something that is not a score ({exc})") from None
        except BaseException:
            self.close(kill=True)
            raise

    def close(self, kill: bool = False) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=0.1 if kill else 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "MeteorProcess":
        return self

    def __exit__(self, *exc) -> bool:
        self.close(kill=exc[0] is not None)
        return False


def meteor_score(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str],
                 timeout_s: float | None = None) -> float:
    """Corpus METEOR 1.5 (``-l en -norm``, as COCO runs it) of tokenised, space-joined captions."""
    if not hypotheses:
        return 0.0
    with MeteorProcess() as meteor:
        return meteor.score(references, hypotheses, timeout_s)


def start_meteor() -> "MeteorProcess | None":
    """A METEOR process started now, to score later (:func:`caption_scores` ``meteor=``); None
    where METEOR cannot run (no Java, no jar)."""
    try:
        return MeteorProcess()
    except _MeteorError:
        return None


# ---------------------------------------------------------------------------------------------
# The one entry point


def _sacrebleu(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str]) -> tuple[float, str]:
    from sacrebleu.metrics import BLEU

    keys = list(hypotheses)
    width = max(len(references[k]) for k in keys)
    # sacreBLEU wants one stream per reference index; None marks a missing reference.
    streams = [[references[k][i].strip() if i < len(references[k]) else None for k in keys]
               for i in range(width)]
    metric = BLEU()
    result = metric.corpus_score([hypotheses[k].strip() for k in keys], streams)
    return float(result.score), str(metric.get_signature())


def caption_scores(references: dict[str, list[str]], hypotheses: dict[str, str], *,
                   meteor: "bool | None | MeteorProcess" = None) -> dict:
    """COCO caption metrics of ``hypotheses`` (key -> caption) against ``references`` (key -> captions).

    Raw strings in; COCO's tokenisation (:func:`capcli.text.tokenize`) is applied inside. Only the
    images in ``hypotheses`` are scored (CIDEr-D's document frequencies come from their
    references). ``meteor``: None runs METEOR when Java and the jar are found, False skips it,
    True requires it (:class:`~capcli.errors.UserError` when it cannot run); a
    :class:`MeteorProcess` from :func:`start_meteor` is used (and closed) instead of starting one.

    Returns ``bleu1``..``bleu4``, ``rouge_l``, ``meteor`` (fractions in [0, 1]; ``meteor`` None
    when skipped, with ``meteor_skipped`` saying why), ``cider`` (CIDEr-D, usual scale, x10) and
    ``sacrebleu`` (0-100, on the raw strings) with ``sacrebleu_signature``.
    """
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    missing = [k for k in hypotheses if k not in references]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} hypothesis key(s) have no references: {shown}")
    empty = [k for k in hypotheses if not references[k]]
    if empty:
        raise ValueError(f"{len(empty)} image(s) have an empty reference list, e.g. {empty[0]!r}")
    for k, h in hypotheses.items():
        if not isinstance(h, str):
            raise ValueError(f"hypothesis for {k!r} is {type(h).__name__}, expected a string")

    tok_refs = {k: [tokenize(r) for r in references[k]] for k in hypotheses}
    tok_hyps = {k: tokenize(h) for k, h in hypotheses.items()}

    hyp_counts, ref_counts = _count_all(tok_refs, tok_hyps, 4)
    scores: dict = {f"bleu{i + 1}": float(s) for i, s in enumerate(_bleu(hyp_counts, ref_counts, 4))}
    scores["meteor"] = None
    scores["rouge_l"] = float(rouge_l(tok_refs, tok_hyps))
    scores["cider"] = float(_cider(hyp_counts, ref_counts, 4))

    if meteor is False:
        scores["meteor_skipped"] = "METEOR not requested"
    else:
        ok, reason = (True, "") if isinstance(meteor, MeteorProcess) else meteor_available()
        if ok:
            refs_text = {k: [" ".join(t) for t in v] for k, v in tok_refs.items()}
            hyps_text = {k: " ".join(v) for k, v in tok_hyps.items()}
            try:
                if isinstance(meteor, MeteorProcess):
                    with meteor:
                        scores["meteor"] = meteor.score(refs_text, hyps_text)
                else:
                    scores["meteor"] = meteor_score(refs_text, hyps_text)
            except _MeteorError as exc:
                ok, reason = False, str(exc)
        if not ok:
            if meteor is True:
                raise UserError(f"METEOR was required but cannot run: {reason}")
            scores["meteor_skipped"] = reason

    scores["sacrebleu"], scores["sacrebleu_signature"] = _sacrebleu(references, hypotheses)
    return scores


# ---------------------------------------------------------------------------------------------
# Top-k accuracy of next-word predictions


def topk_hits(logits, targets, mask, k: int = 5):
    """(correct, total) as 0-d tensors on the logits' device: no host sync, for the training loop
    to add up and read only when it reports. Shapes as :func:`topk_correct`."""
    if logits.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, "
                         f"mask {tuple(mask.shape)}; expected (..., V), (...), (...)")
    k = max(1, min(int(k), logits.shape[-1]))
    top = logits.detach().topk(k, dim=-1).indices
    hit = (top == targets.unsqueeze(-1).to(top.dtype)).any(dim=-1)
    keep = mask.bool()
    return (hit & keep).sum(), keep.sum()


def topk_correct(logits, targets, mask, k: int = 5) -> tuple[int, int]:
    """(correct, total): unmasked positions whose target is among the ``k`` highest logits.

    ``logits`` (..., V), ``targets`` and ``mask`` (...) with the same leading shape, e.g.
    (B, T, V), (B, T), (B, T). Integers, so callers can add them up across batches.
    """
    correct, total = topk_hits(logits, targets, mask, k)
    return int(correct.item()), int(total.item())


def top5_accuracy(logits, targets, mask) -> float:
    """Share of unmasked positions whose target is in the top-5 logits (0.0 when none is unmasked)."""
    correct, total = topk_correct(logits, targets, mask, k=5)
    return correct / total if total else 0.0
