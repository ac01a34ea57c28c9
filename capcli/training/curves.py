"""``results.png``: a run's curves from its metrics.jsonl records, redrawn at each validation
(Pillow only): loss and top-5 accuracy (training and validation, teacher-forced), and validation
BLEU-4 and CIDEr-D (free-running), against the epoch."""

from __future__ import annotations

import math
from pathlib import Path

# (title, [(record key, legend, colour)], scale)
PANELS = (
    ("loss", [("train_loss", "train", (31, 119, 180)), ("val_loss", "val", (255, 127, 14))], 1.0),
    ("top-5 accuracy (%)", [("train_top5", "train", (31, 119, 180)), ("val_top5", "val", (255, 127, 14))], 100.0),
    ("val BLEU-4 (x100)", [("val_bleu4", "val", (44, 160, 44))], 100.0),
    ("val CIDEr-D", [("val_cider", "val", (214, 39, 40))], 1.0),
)
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


def draw_curves(records: list[dict], path: Path) -> Path:
    """Draw the four panels of ``records`` (metrics.jsonl objects) into the PNG ``path``."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (2 * PANEL_W, 2 * PANEL_H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    epochs = [_number(r.get("epoch")) for r in records]
    xs = [e for e in epochs if e is not None] or [0.0]
    x_lo, x_hi = min(0.0, min(xs)), max(max(xs), 1.0)
    for p, (title, series, scale) in enumerate(PANELS):
        ox, oy = (p % 2) * PANEL_W, (p // 2) * PANEL_H
        left, top = ox + MARGIN[0], oy + MARGIN[2]
        right, bottom = ox + PANEL_W - MARGIN[1], oy + PANEL_H - MARGIN[3]
        lines = [[(e, v * scale) for e, r in zip(epochs, records)
                  if e is not None and (v := _number(r.get(key))) is not None] for key, _, _ in series]
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
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, oy + 8), title, fill="black", font=font)
        draw.text((right - 30, bottom + 20), "epoch", fill="black", font=font)
        for i, (line, (_, legend, colour)) in enumerate(zip(lines, series)):
            points = [px(x, y) for x, y in line]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            if not points:
                continue
            lx = left + 200 + 60 * i
            draw.rectangle([lx, oy + 10, lx + 10, oy + 18], fill=colour)
            draw.text((lx + 14, oy + 8), legend, fill="black", font=font)
    img.save(path, format="PNG")
    return path
