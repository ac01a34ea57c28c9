"""Training objectives: what a step optimises, as a module the trainer calls on each batch.

An objective wraps the captioner (so DDP wraps the objective and sees every parameter it trains)
and maps ``(batch, tf_ratio)`` to a dict:

- ``loss``: the scalar to back-propagate;
- ``sums``: a 1-D float64 tensor of running sums (named by ``sum_names``) that stays on the device
  and is added up over steps; the trainer reads it only when it reports;
- ``samples``: how many caption-image pairs (or sampled captions) the step trained on.

``summary(sums)`` turns added-up sums into the numbers logged (``loss``, ``top5``, ...), so the
training loop never needs to know which objective it runs.
"""

from __future__ import annotations

import torch
from torch import nn

from capcli.decode import beam_search, policy_logits, sample
from capcli.metrics import CiderD
from capcli.models.loss import XE_SUMS, xe_loss, xe_summary
from capcli.runtime import all_ranks_true, autocast
from capcli.text import tokenize


class XEObjective(nn.Module):
    """Cross-entropy of each next word plus the doubly stochastic attention penalty (Show, Attend
    and Tell, weight ``alpha_c``), with teacher forcing at ``tf_ratio``: :func:`capcli.models.loss.xe_loss`."""

    name = "xe"
    sum_names = XE_SUMS
    summary = staticmethod(xe_summary)

    def __init__(self, model: nn.Module, alpha_c: float = 1.0):
        super().__init__()
        self.model = model
        self.alpha_c = alpha_c

    def forward(self, batch: dict, tf_ratio: float = 1.0, feats: torch.Tensor | None = None) -> dict:
        """``batch``: ``captions`` (B, K, T+1), ``lengths`` (B, K) and ``images`` or ``regions``;
        ``feats``: the batch's region features when already computed."""
        if feats is None:
            feats = self.model.features(batch.get("images"), batch.get("regions"))
        return xe_loss(self.model, feats, batch["captions"], batch["lengths"], tf_ratio, self.alpha_c)


END_TOKEN = "<end>"  # closes references and ended samples in the reward; no tokenised caption has it


class SCSTObjective(nn.Module):
    """Self-critical sequence training (Rennie et al., CVPR 2017): sample ``samples`` captions per
    image from the model, reward each with its CIDEr-D against the image's references (document
    frequencies of the whole training split, as :class:`capcli.metrics.CiderD`), subtract a
    baseline and follow the policy gradient ``-(r - b) * log p(caption)``.

    Baselines: ``mean``, the average reward of the image's other samples (Luo 2020, "A better
    variant of self-critical sequence training"); ``greedy``, the reward of the model's greedy
    caption (Rennie et al.).

    Samples are drawn from softmax(logits / ``temperature``), among the ``top_k`` likeliest words
    when ``top_k`` > 0: below 1 the samples stay near the captions beam search gives, so the
    policy gradient sharpens those rather than the tail a short-trained model samples at T = 1.

    <unk> is never sampled (as no decode emits it). Captions are sampled without gradient, then
    scored with gradient by one teacher-forced pass of the decoder over the sampled words (the fast
    training path), with dropout off in both and the same temperature and top k, so that the
    probabilities differentiated are exactly those that drew the samples. Words after
    <end> carry no gradient; captions that never end are cut at ``max_length``.
    """

    name = "scst"
    sum_names = ("loss", "reward", "baseline", "ended", "samples", "tokens")

    def __init__(self, model: nn.Module, train_set, *, samples: int = 5, baseline: str = "mean",
                 max_length: int = 16, temperature: float = 1.0, top_k: int = 0):
        super().__init__()
        self.model = model
        self.samples, self.baseline, self.max_length = samples, baseline, max_length
        self.temperature, self.top_k = temperature, top_k
        vocab = train_set.vocab
        self.start, self.end, self.pad, self.unk = vocab.start, vocab.end, vocab.pad, vocab.unk
        refs = train_set.references()  # every raw reference of every training image
        # the end of a caption is part of the reward (as <end> is part of what the policy
        # emits): references and ended samples close with END_TOKEN, whose n-grams reward ending
        # where references end and nothing else ("... playing in a red" earns no "a red <end>")
        self.cider = CiderD.from_references(dict(enumerate(refs)), end=END_TOKEN)
        # a word id -> its tokens as the COCO tokenisation of the decoded caption gives them
        self.word_tokens = [tokenize(w) for w in vocab.itos]
        banned = torch.zeros(len(vocab.itos), dtype=torch.bool)
        # never sampled: <pad> and <start> (decode.sample) and <unk>, which no decode emits either
        banned[[self.pad, self.start, self.unk]] = True
        self.register_buffer("banned", banned, persistent=False)

    def rewards(self, images: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """CIDEr-D of each row of ``tokens`` (word ids, then <end>/<pad>) against the references
        of training image ``images[row]``, the ends included (:data:`END_TOKEN`): float64 on the CPU."""
        out = []
        for img, row in zip(images, tokens.tolist()):
            words: list[str] = []
            for t in row:
                if t == self.end:
                    words.append(END_TOKEN)
                    break
                if t == self.pad:
                    break
                words.extend(self.word_tokens[t])
            out.append(self.cider.score(img, words))
        return torch.tensor(out, dtype=torch.float64)

    def forward(self, batch: dict, tf_ratio: float = 1.0, feats: torch.Tensor | None = None) -> dict:
        if feats is None:
            feats = self.model.features(batch.get("images"), batch.get("regions"))
        b, k = feats.size(0), self.samples
        images = batch["index"].tolist()
        dec = self.model.decoder
        dropout_was = dec.dropout.training
        dec.dropout.eval()
        try:
            s = sample(dec, feats.detach().float(), start=self.start, end=self.end, pad=self.pad,
                       max_length=self.max_length, banned=(self.unk,), per_image=k,
                       temperature=self.temperature, top_k=self.top_k)
            reward = self.rewards([i for i in images for _ in range(k)], s.tokens)
            if self.baseline == "greedy":
                greedy = beam_search(dec, feats.detach().float(), start=self.start, end=self.end, pad=self.pad,
                                     beam_size=1, max_length=self.max_length, banned=(self.unk,))
                rows = torch.full((b, self.max_length + 1), self.pad, dtype=torch.long)
                for i, t in enumerate(greedy.tokens):
                    rows[i, :len(t)] = torch.tensor(t, dtype=torch.long)
                base = self.rewards(images, rows).repeat_interleave(k)
            else:  # the mean of the other samples of the same image
                per_image = reward.view(b, k)
                base = ((per_image.sum(1, keepdim=True) - per_image) / (k - 1)).view(-1)
            mask = s.tokens != self.pad  # the words and the <end>, nothing after it
            logp = self.log_probs(feats, s.tokens, mask, per_image=k)
        finally:
            dec.dropout.train(dropout_was)
        advantage = (reward - base).to(logp.device, logp.dtype)
        tokens = mask.sum()
        loss = -(advantage.unsqueeze(1) * logp * mask).sum() / tokens.clamp(min=1)
        n = b * k
        sums = torch.stack([loss.detach().double() * n, reward.sum().to(loss.device), base.sum().to(loss.device),
                            s.ended.sum().double(), torch.tensor(float(n), dtype=torch.float64, device=loss.device),
                            tokens.double()])
        return {"loss": loss, "sums": sums, "samples": n}

    def log_probs(self, feats: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, per_image: int) -> torch.Tensor:
        """log p of each sampled word (B*k, T) under the policy that drew it (banned words out,
        then the temperature and the top k), by one teacher-forced pass with gradient; 0 where
        ``mask`` is False (after <end>)."""
        b = feats.size(0)
        captions = torch.cat([torch.full((tokens.size(0), 1), self.start, device=tokens.device), tokens], 1)
        logits, _ = self.model.decode_captions(feats, captions.view(b, per_image, -1), 1.0,
                                               lengths=(mask.sum(1) + 1).view(b, per_image))
        # <pad> after <end> was never drawn: read <end>'s probability there, then mask it out
        drawn = tokens.masked_fill(~mask, self.end).unsqueeze(2)
        # the drawn word stays in the top k even where this pass's k-th logit differs from the
        # sampler's in the last bit (a -inf log-probability would make the loss infinite)
        logits = policy_logits(logits.float().masked_fill(self.banned, float("-inf")), self.temperature,
                               self.top_k, keep=drawn)
        logp = torch.log_softmax(logits, dim=-1).gather(2, drawn).squeeze(2)
        return logp.masked_fill(~mask, 0.0)

    @staticmethod
    def summary(sums: list[float]) -> dict:
        loss, reward, baseline, ended, samples, _ = sums
        n = max(samples, 1.0)
        return {"loss": loss / n, "reward": reward / n, "baseline": baseline / n, "ended": ended / n}


def build_objective(t, name: str, model: nn.Module, train_set=None, max_length: int = 16) -> nn.Module:
    """The objective ``name`` (xe | scst) around ``model``, set up by the train config ``t``;
    ``max_length``: the longest caption scst samples."""
    if name == "xe":
        return XEObjective(model, t.alpha_c)
    if name == "scst":
        return SCSTObjective(model, train_set, samples=t.scst_samples, baseline=t.scst_baseline,
                             max_length=max_length, temperature=t.scst_temperature, top_k=t.scst_top_k)
    raise ValueError(f"unknown objective {name!r}")  # config validation lists them


def make_adam(groups: list[dict], weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam in its fused form where this torch has it for the parameters' device (CUDA; the CPU
    from torch 2.4): one kernel for all parameters instead of a loop over them, several times
    faster than the default on a CPU at the decoder's size. Else the multi-tensor (foreach) form."""
    try:
        return torch.optim.Adam(groups, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused not supported here
        return torch.optim.Adam(groups, weight_decay=weight_decay, foreach=True)


class TrainStep:
    """One optimisation step, the same for training and `capcli benchmark train`: the objective
    under autocast, backward (scaled for fp16), gradient clipping by value, the optimizer step.

    A step whose loss is not finite (NaN or inf, on any rank) changes nothing: no backward, no
    update; its output says ``skipped`` and the trainer counts it (``train.max_bad_steps``). That
    check reads one number per step from the device.

    ``task`` is the objective, or its DDP wrapper; ``params`` the parameters that are clipped.
    """

    def __init__(self, task: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 device: torch.device, amp_dtype: torch.dtype | None = None, grad_clip: float = 0.0,
                 world: int = 1):
        self.task, self.optimizer, self.scaler = task, optimizer, scaler
        self.device, self.amp_dtype, self.grad_clip, self.world = device, amp_dtype, grad_clip, world
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def _finite(self, loss: torch.Tensor) -> bool:
        return all_ranks_true(torch.isfinite(loss.detach()).float(), self.world)  # every rank skips, or none

    def __call__(self, batch: dict, tf_ratio: float = 1.0) -> dict:
        with autocast(self.device, self.amp_dtype):
            out = self.task(batch, tf_ratio)
        self.optimizer.zero_grad(set_to_none=True)
        out["skipped"] = not self._finite(out["loss"])
        if out["skipped"]:
            return out
        self.scaler.scale(out["loss"]).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_value_(self.params, self.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return out
