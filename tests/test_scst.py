"""Self-critical training: the reward is the metrics' CIDEr-D, the mean baseline cancels identical
samples, resume stays exact, init_from checks the vocabulary, and on the synthetic scenes a short
SCST stage beats as many further cross-entropy epochs."""

from __future__ import annotations

import json

import pytest
import torch

from capcli.config import load_config
from capcli.data.dataset import CaptionDataset
from capcli.decode import Samples
from capcli.errors import UserError
from capcli.metrics import cider_d
from capcli.models.captioner import CaptionModel
from capcli.text import tokenize
from capcli.training.trainer import Trainer, train
from capcli.training.objectives import SCSTObjective
from tests.conftest import TINY_OVERRIDES

CPU = torch.device("cpu")


def cfg_for(data, runs, *extra):
    return load_config("tiny", [f"data.dir={data}", f"run.dir={runs}", *TINY_OVERRIDES,
                                "data.val_max_images=3", *extra])


@pytest.fixture(scope="module")
def xe_run(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("scst_runs")
    train(cfg_for(tiny_data, runs, "run.name=xe", "train.epochs=2"), CPU)
    return runs / "xe"


def test_reward_is_the_metrics_cider_d_with_the_end_of_each_caption(tiny_data):
    """Each sample's reward equals the per-image CIDEr-D that capcli.metrics computes for the same
    caption when the whole training split is scored (the same document frequencies), with an end
    token closing every reference and every ended caption: ending where references end pays, and
    stopping one word short costs more than it would without the end token."""
    from capcli.metrics import CiderD
    from capcli.training.objectives import END_TOKEN

    ds = CaptionDataset(tiny_data, "train")
    vocab = ds.vocab
    cfg = load_config("tiny", [f"data.dir={tiny_data}", *TINY_OVERRIDES])
    objective = SCSTObjective(CaptionModel(cfg.model, len(vocab)), ds, samples=2, max_length=12)
    refs = ds.references()
    g = torch.Generator().manual_seed(0)
    rows = torch.full((len(ds), 13), vocab.pad, dtype=torch.long)
    hyps = {}
    for i in range(len(ds)):  # a reference's first words, or random words, then <end>
        words = tokenize(refs[i][0])[: 3 + i % 5] if i % 2 else \
            [vocab.itos[j] for j in torch.randint(4, len(vocab), (6,), generator=g).tolist()]
        ids = [vocab.stoi.get(w, vocab.unk) for w in words]
        rows[i, :len(ids)] = torch.tensor(ids)
        rows[i, len(ids)] = vocab.end
        hyps[str(i)] = vocab.decode(ids)
    rewards = objective.rewards(list(range(len(ds))), rows)
    closed = cider_d({str(i): [tokenize(r) + [END_TOKEN] for r in refs[i]] for i in range(len(ds))},
                     {k: tokenize(h) + [END_TOKEN] for k, h in hyps.items()}, per_image=True)
    for i in range(len(ds)):
        assert rewards[i].item() == pytest.approx(closed[str(i)], rel=1e-12, abs=1e-12)
    assert rewards.max().item() > 0.5  # the reference-prefix captions do earn a reward

    # a whole reference against the same words less the last: the end token widens the gap
    full = [vocab.stoi.get(w, vocab.unk) for w in tokenize(refs[0][0])]
    rows = torch.full((2, len(full) + 1), vocab.pad, dtype=torch.long)
    rows[0, :len(full)], rows[0, len(full)] = torch.tensor(full), vocab.end
    rows[1, :len(full) - 1], rows[1, len(full) - 1] = torch.tensor(full[:-1]), vocab.end
    with_end = objective.rewards([0, 0], rows)
    plain = CiderD.from_references(dict(enumerate(refs)))
    without = [plain.score(0, tokenize(vocab.decode(r.tolist()))) for r in rows]
    assert with_end[0] - with_end[1] > without[0] - without[1] > 0
    # a caption cut at max_length (no <end>) gets no end token
    cut = objective.rewards([0], rows[:1, :len(full)])
    assert cut.item() == pytest.approx(CiderD.from_references(dict(enumerate(refs)), end=END_TOKEN).score(
        0, tokenize(vocab.decode(full))), rel=1e-12)


def test_mean_baseline_with_identical_samples_gives_no_gradient(tiny_data, monkeypatch):
    ds = CaptionDataset(tiny_data, "train")
    cfg = load_config("tiny", [f"data.dir={tiny_data}", *TINY_OVERRIDES])
    torch.manual_seed(0)
    model = CaptionModel(cfg.model, len(ds.vocab))
    objective = SCSTObjective(model, ds, samples=3, baseline="mean", max_length=8)
    images = torch.stack([ds[i]["image"] for i in range(2)])

    def same_three(decoder, feats, **kw):  # every image's 3 samples are one caption
        rows = torch.tensor([[5, 6, 7, ds.vocab.end, 0], [8, ds.vocab.end, 0, 0, 0]])
        tokens = rows.repeat_interleave(3, 0)
        return Samples(tokens, torch.ones(6, dtype=torch.bool), (tokens > 3).sum(1))

    monkeypatch.setattr("capcli.training.objectives.sample", same_three)
    out = objective({"images": images, "index": torch.tensor([0, 1])})
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    assert out["sums"][1].item() == pytest.approx(out["sums"][2].item())  # reward sum = baseline sum

    # different samples: a gradient, and it pushes the better-rewarded caption up
    def two_kinds(decoder, feats, **kw):
        good = [ds.vocab.stoi.get(w, ds.vocab.unk) for w in tokenize(ds.references()[0][0])[:4]] + [ds.vocab.end]
        bad = [9, 9, 9, 9, ds.vocab.end]
        tokens = torch.tensor([good, bad, bad, good, bad, bad])
        return Samples(tokens, torch.ones(6, dtype=torch.bool), torch.full((6,), 4))

    model.zero_grad()
    monkeypatch.setattr("capcli.training.objectives.sample", two_kinds)
    out = objective({"images": images, "index": torch.tensor([0, 1])})
    out["loss"].backward()
    assert any(torch.count_nonzero(p.grad) > 0 for p in model.parameters() if p.grad is not None)


def test_scst_resume_is_exact(tiny_data, tmp_path, xe_run):
    extra = ["train.objective=scst", f"train.init_from={xe_run}", "train.epochs=2", "train.scst_samples=3"]
    train(cfg_for(tiny_data, tmp_path, "run.name=full", *extra), CPU)
    trainer = Trainer(cfg_for(tiny_data, tmp_path, "run.name=part", *extra), CPU)
    trainer.emit = lambda e, **i: setattr(trainer.signals, "received", "SIGTERM") if (
        e == "step" and i["epoch"] == 0 and i["step"] == 3) else None
    assert trainer.fit()["stop_reason"] == "signal"
    train(None, CPU, resume=tmp_path / "part")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    assert a["best_metric"] == "cider"
    last = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"train_reward", "train_baseline", "train_ended", "val_cider"} <= set(last)


def records_of(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


SWITCH = ["train.epochs=2", "train.scst_after=1", "train.scst_samples=3", "train.scst_lr=2e-4",
          "train.scst_warmup_steps=2"]


def stop_at(trainer, epoch: int, step: int) -> None:
    """Send the trainer a SIGTERM (as a scheduler does) after step ``step`` of epoch ``epoch``."""
    trainer.emit = lambda e, **i: setattr(trainer.signals, "received", "SIGTERM") if (
        e == "step" and i["epoch"] == epoch and i["step"] == step) else None


def test_scst_after_switches_inside_one_run_and_resumes_exactly_across_the_switch(tiny_data, tmp_path):
    """train.scst_after=1: one epoch of cross-entropy, then self-critical training in the same run,
    with its own Adam at scst_lr (warmed up), each metrics row naming its objective, best.pt by
    CIDEr-D; a run stopped before the switch or after it and resumed ends with the same weights."""
    summary = train(cfg_for(tiny_data, tmp_path, "run.name=full", *SWITCH), CPU)
    recs = records_of(tmp_path / "full")
    assert [r["objective"] for r in recs] == ["xe", "scst"]
    assert "train_ce" in recs[0] and {"train_reward", "train_baseline"} <= set(recs[1])
    assert recs[0]["lr"] == pytest.approx(1e-3) and recs[1]["lr"] == pytest.approx(2e-4)  # tiny's lr, scst_lr
    assert summary["best_metric"] == "cider"
    last = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    assert last["stage"] == "scst" and last["best_metric"] == "cider"
    # tiny fine-tunes its encoder: in the second stage too, its rate scaled as the decoder's (5e-4 * 2e-4 / 1e-3)
    assert [g["initial_lr"] for g in last["optimizer"]["param_groups"]] == pytest.approx([2e-4, 1e-4])
    for epoch, step in ((0, 2), (1, 2)):  # before the switch, after it
        name = f"part{epoch}"
        trainer = Trainer(cfg_for(tiny_data, tmp_path, f"run.name={name}", *SWITCH), CPU)
        stop_at(trainer, epoch, step)
        assert trainer.fit()["stop_reason"] == "signal"
        train(None, CPU, resume=tmp_path / name)
        part = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
        for key in last["model"]:
            torch.testing.assert_close(part["model"][key], last["model"][key], rtol=0, atol=0, msg=f"{name} {key}")
        assert [r["objective"] for r in records_of(tmp_path / name)][-1] == "scst"


def test_the_self_critical_stage_validates_on_its_own_schedule(tiny_data, tmp_path):
    """train.scst_val_every: cross-entropy validates once per epoch (val_every=1), the
    self-critical stage after the switch every 2 steps; unset, both follow val_every."""
    train(cfg_for(tiny_data, tmp_path, "run.name=own", *SWITCH, "train.scst_val_every=2 steps"), CPU)
    recs = [r for r in records_of(tmp_path / "own") if "val_cider" in r]
    xe, scst = [r for r in recs if r["objective"] == "xe"], [r for r in recs if r["objective"] == "scst"]
    per_epoch = xe[-1]["step"]
    assert len(xe) == 1 and per_epoch >= 4
    assert [r["step"] for r in scst] == list(range(per_epoch + 2, 2 * per_epoch + 1, 2)) + (
        [2 * per_epoch] if per_epoch % 2 else [])
    train(cfg_for(tiny_data, tmp_path, "run.name=same", *SWITCH), CPU)
    assert [r["step"] for r in records_of(tmp_path / "same") if "val_cider" in r] == [per_epoch, 2 * per_epoch]
    with pytest.raises(UserError, match="train.scst_val_every"):
        load_config("tiny", ["train.scst_val_every=often"])


def test_scst_after_a_share_of_the_budget_switches_mid_epoch(tiny_data, tmp_path):
    """train.scst_after="50%": once half of max_minutes has passed (here: the run's clock moved on
    by 6 of its 10 minutes after step 2), the cross-entropy weights are validated and saved, and the
    next steps are self-critical; the learning rate warms up from the switch."""
    trainer = Trainer(cfg_for(tiny_data, tmp_path, "run.name=share", "train.epochs=2", "train.max_minutes=10",
                              "train.scst_after=50%", "train.scst_samples=3", "train.scst_warmup_steps=4"), CPU)
    lrs = []

    def emit(event, **info):
        if event == "step" and info["epoch"] == 0 and info["step"] == 2:
            trainer.budget.t0 -= 360
        if event == "step":
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
    trainer.emit = emit
    trainer.fit()
    recs = records_of(tmp_path / "share")
    # validated at the switch, after the second step
    assert recs[0]["objective"] == "xe" and recs[0]["step"] == 2 and "val_cider" in recs[0]
    assert {r["objective"] for r in recs[1:]} == {"scst"}
    assert lrs[:2] == pytest.approx([1e-3, 1e-3])  # tiny's cross-entropy rate
    assert lrs[2:4] == pytest.approx([1e-4 / 4, 2e-4 / 4])  # then scst_lr (1e-4) over a 4-step warm-up


def test_scst_after_auto_switches_when_cider_stops_improving(tiny_data, tmp_path, monkeypatch):
    """train.scst_after=auto without a budget: the first validation that brings no better CIDEr-D
    ends the cross-entropy stage, and the best cross-entropy weights start self-critical training."""
    scores = iter([0.5, 0.4] + [0.3] * 20)
    real = Trainer.validate

    def fake(self):
        out = real(self)
        out["cider"] = next(scores)
        return out
    monkeypatch.setattr(Trainer, "validate", fake)
    train(cfg_for(tiny_data, tmp_path, "run.name=auto", "train.epochs=3", "train.scst_after=auto",
                  "train.val_every=2 steps", "train.scst_samples=3"), CPU)
    recs = records_of(tmp_path / "auto")
    objectives = [r["objective"] for r in recs]
    assert objectives[:2] == ["xe", "xe"] and set(objectives[2:]) == {"scst"}


@pytest.mark.parametrize("value, message", [("50%", "max_minutes"), (2, "no self-critical epoch"),
                                            ("150%", "scst_after"), ("soon", "scst_after")])
def test_scst_after_bad_values_are_one_line_errors(value, message):
    with pytest.raises(UserError, match=message):
        load_config("tiny", [f"train.scst_after={value}", "train.epochs=2"])
    with pytest.raises(UserError, match="objective=xe"):
        load_config("tiny", ["train.scst_after=1", "train.objective=scst"])


def test_init_from_needs_the_datasets_vocabulary(tmp_path, xe_run, runner):
    from tests.conftest import invoke

    other = tmp_path / "other"
    invoke(runner, ["prepare", "synthetic", "--out", other, "--images", 30, "--size", 32, "--seed", 5, "--quiet"])
    vocab = json.loads((other / "vocab.json").read_text())
    (other / "vocab.json").write_text(json.dumps(vocab + ["zebra"]))
    with pytest.raises(UserError, match="vocabulary"):
        train(cfg_for(other, tmp_path, "train.objective=scst", f"train.init_from={xe_run}"), CPU)
    with pytest.raises(UserError, match="scst_samples"):
        load_config("tiny", ["train.objective=scst", "train.scst_samples=1"])


@pytest.mark.slow
def test_scst_beats_more_cross_entropy_on_the_synthetic_scenes(tmp_path, runner):
    """From a short xe run, 3 epochs of scst raise test CIDEr-D above 3 more epochs of xe."""
    from capcli.decode import DecodeOptions
    from capcli.evaluate import evaluate_model
    from capcli.api import load_model
    from tests.conftest import invoke

    data = tmp_path / "data"
    invoke(runner, ["prepare", "synthetic", "--out", data, "--images", 600, "--size", 64, "--quiet"])
    base = ["train.batch_size=80", "data.val_max_images=40", "model.grid=2", "train.val_beam=1"]
    train(load_config("tiny", [f"data.dir={data}", f"run.dir={tmp_path}", "run.name=xe", "train.epochs=4", *base]), CPU)
    train(load_config("tiny", [f"data.dir={data}", f"run.dir={tmp_path}", "run.name=xe_more", "train.epochs=3",
                               f"train.init_from={tmp_path / 'xe'}", *base]), CPU)
    train(load_config("tiny", [f"data.dir={data}", f"run.dir={tmp_path}", "run.name=scst", "train.epochs=3",
                               "train.objective=scst", f"train.init_from={tmp_path / 'xe'}", "train.lr=2e-4",
                               "train.encoder_lr=5e-5", *base]), CPU)
    test = CaptionDataset(data, "test")
    scores = {}
    for name in ("xe", "xe_more", "scst"):
        model, vocab, _, _ = load_model(tmp_path / name / "checkpoints" / "last.pt")
        scores[name] = evaluate_model(model, test, CPU, DecodeOptions(beam_size=3), vocab=vocab, meteor=False)["cider"]
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    print("test CIDEr-D:", scores)
    assert scores["scst"] > scores["xe_more"], scores


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.5, 0), (0.7, 5)])
def test_scored_log_probs_are_the_policy_that_drew_the_samples(tiny_data, temperature, top_k):
    """The policy gradient differentiates log p under the distribution the sampler drew from:
    <unk> banned, logits over the temperature, only the top k words. Checked against the plain
    decoder stepped by hand; a teacher-forced pass at T = 1 would differ (the first case shows the
    check can tell them apart)."""
    ds = CaptionDataset(tiny_data, "train")
    vocab = ds.vocab
    cfg = load_config("tiny", [f"data.dir={tiny_data}", *TINY_OVERRIDES])
    torch.manual_seed(0)
    model = CaptionModel(cfg.model, len(vocab)).eval()
    objective = SCSTObjective(model, ds, samples=3, max_length=8, temperature=temperature, top_k=top_k)
    dec = model.decoder
    with torch.no_grad():
        feats = model.features(torch.stack([ds[i]["image"] for i in range(2)]), None)
        from capcli.decode import sample
        s = sample(dec, feats, start=vocab.start, end=vocab.end, pad=vocab.pad, max_length=8,
                   banned=(vocab.unk,), per_image=3, temperature=temperature, top_k=top_k,
                   generator=torch.Generator().manual_seed(1))
        mask = s.tokens != vocab.pad
        got = objective.log_probs(feats, s.tokens, mask, per_image=3)

        # by hand: the plain step, one caption at a time
        rows = feats.repeat_interleave(3, 0)
        h, c = dec.init_state(rows)
        proj = dec.attention.project(rows)
        token = torch.full((rows.size(0),), vocab.start)
        want = torch.zeros_like(got)
        plain = torch.zeros_like(got)
        for t in range(s.tokens.size(1)):
            h, c, _ = dec.step(token, rows, proj, h, c)
            logits = dec.logits(h).float()
            logits[:, [vocab.pad, vocab.start, vocab.unk]] = float("-inf")
            plain[:, t] = torch.log_softmax(logits, 1).gather(1, s.tokens[:, t:t + 1].clamp(min=1)).squeeze(1)
            logits = logits / temperature
            if top_k:
                kth = logits.topk(top_k, 1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            want[:, t] = torch.log_softmax(logits, 1).gather(1, s.tokens[:, t:t + 1].clamp(min=1)).squeeze(1)
            token = s.tokens[:, t].clamp(min=1)
    want, plain = want.masked_fill(~mask, 0.0), plain.masked_fill(~mask, 0.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if (temperature, top_k) != (1.0, 0):
        assert (got - plain).abs().max() > 1e-2
