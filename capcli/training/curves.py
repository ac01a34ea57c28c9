"""``results.png``: a run's curves from its metrics.jsonl records, redrawn at each validation
(Pillow only). Four panels, loss and top-5 accuracy (training and validation, teacher-forced) and
validation BLEU-4 and CIDEr-D (free-running, beside the mean CIDEr-D of the captions sampled for
self-critical training), drawn twice: against the epoch (top row) and against the minutes of the
run (bottom row). A dashed line marks the switch to self-critical training (``train.scst_after``),
and a small triangle on the top edge each change of the learning rate.

The training loss of self-critical steps is a policy-gradient loss, not a cross-entropy: it is
left out of the loss panel (its reward is drawn instead)."""

from __future__ import annotations

import math
from pathlib import Path

# (title, [(record key, legend, colour)], scale)
PANELS = (
    ("loss", [("train_loss", "train", (31, 119, 180)), ("val_loss", "val", (255, 127, 14))], 1.0),
    ("top-5 accuracy (%)", [("train_top5", "train", (31, 119, 180)), ("val_top5", "val", (255, 127, 14))], 100.0),
    ("val BLEU-4 (x100)", [("val_bleu4", "val", (44, 160, 44))], 100.0),
    ("CIDEr-D", [("val_cider", "val", (214, 39, 40)), ("train_reward", "sampled", (148, 103, 189))], 1.0),
)
# the x axes: (record key, label, scale)
AXES = (("epoch", "epoch", 1.0), ("elapsed_s", "minutes", 1 / 60))
SWITCH_COLOUR = (23, 190, 207)  # the dashed line at the switch to self-critical training
LR_COLOUR = (140, 86, 75)  # the triangles at learning-rate changes
PANEL_W, PANEL_H = 420, 300
MARGIN = (56, 16, 34, 40)  # left, right, top, bottom of each panel's plotting area


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def _ticks(lo: float, hi: float) -> list[float]:
    raw = (hi - lo) / 4 or 1.0
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2) if start + i * step <= hi + 1e-12]


def _value(record: dict, key: str) -> float | None:
    if key == "train_loss" and record.get("objective", "xe") != "xe":
        return None  # a policy-gradient loss: not on the cross-entropy's scale
    return _number(record.get(key))


def switch_index(records: list[dict]) -> int | None:
    """The first record of self-critical training after cross-entropy ones, if the run switched."""
    for i, r in enumerate(records):
        if r.get("objective") == "scst" and any(p.get("objective") == "xe" for p in records[:i]):
            return i
    return None


def lr_changes(records: list[dict]) -> list[int]:
    """The records whose learning rate differs from the one before (by more than rounding)."""
    out = []
    for i in range(1, len(records)):
        a, b = _number(records[i - 1].get("lr")), _number(records[i].get("lr"))
        if a is not None and b is not None and abs(a - b) > 1e-6 * max(abs(a), abs(b)):
            out.append(i)
    return out


def draw_curves(records: list[dict], path: Path) -> Path:
    """Draw the panels of ``records`` (metrics.jsonl objects) into the PNG ``path``."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (len(PANELS) * PANEL_W, len(AXES) * PANEL_H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    switch = switch_index(records)
    changes = lr_changes(records)
    for row, (x_key, x_label, x_scale) in enumerate(AXES):
        xs_all = [v * x_scale if (v := _number(r.get(x_key))) is not None else None for r in records]
        xs = [x for x in xs_all if x is not None] or [0.0]
        x_lo, x_hi = min(0.0, min(xs)), max(max(xs), 1.0)
        for p, (title, series, scale) in enumerate(PANELS):
            ox, oy = p * PANEL_W, row * PANEL_H
            left, top = ox + MARGIN[0], oy + MARGIN[2]
            right, bottom = ox + PANEL_W - MARGIN[1], oy + PANEL_H - MARGIN[3]
            lines = [[(x, v * scale) for x, r in zip(xs_all, records)
                      if x is not None and (v := _value(r, key)) is not None] for key, _, _ in series]
            values = [v for line in lines for _, v in line]
            y_lo, y_hi = (min(values), max(values)) if values else (0.0, 1.0)
            if y_hi - y_lo < 1e-9:
                y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
            pad = 0.05 * (y_hi - y_lo)
            y_lo, y_hi = y_lo - pad, y_hi + pad

            def px(x: float, y: float) -> tuple[float, float]:
                return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                        bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

            for t in _ticks(y_lo, y_hi):
                y = px(x_lo, t)[1]
                if top <= y <= bottom:
                    draw.line([left, y, right, y], fill=(232, 232, 232))
                    draw.text((ox + 4, y - 6), f"{t:.4g}", fill="black", font=font)
            for t in _ticks(x_lo, x_hi):
                x = px(t, y_lo)[0]
                if left <= x <= right:
                    draw.line([x, bottom, x, bottom + 4], fill="black")
                    draw.text((x - 6, bottom + 6), f"{t:g}", fill="black", font=font)
            if switch is not None and xs_all[switch] is not None:
                # halfway between the last cross-entropy record and the first self-critical one
                before = next((xs_all[i] for i in range(switch - 1, -1, -1) if xs_all[i] is not None), xs_all[switch])
                x = px((before + xs_all[switch]) / 2, y_lo)[0]
                for y in range(int(top), int(bottom), 8):
                    draw.line([x, y, x, min(y + 4, bottom)], fill=SWITCH_COLOUR, width=1)
                draw.text((x + 3, top + 2), "SCST", fill=SWITCH_COLOUR, font=font)
            for i in changes:
                if xs_all[i] is not None:
                    x = px(xs_all[i], y_lo)[0]
                    draw.polygon([(x - 4, top), (x + 4, top), (x, top + 7)], fill=LR_COLOUR)
            draw.rectangle([left, top, right, bottom], outline="black")
            draw.text((left, oy + 8), title, fill="black", font=font)
            draw.text((right - 6 * len(x_label), bottom + 20), x_label, fill="black", font=font)
            for i, (line, (_, legend, colour)) in enumerate(zip(lines, series)):
                points = [px(x, y) for x, y in line]
                if len(points) > 1:
                    draw.line(points, fill=colour, width=2)
                for x, y in points:
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
                if not points:
                    continue
                lx = left + 170 + 70 * i
                draw.rectangle([lx, oy + 10, lx + 10, oy + 18], fill=colour)
                draw.text((lx + 14, oy + 8), legend, fill="black", font=font)
    img.save(path, format="PNG")
    return path
