"""PNG plots of benchmark rows (Pillow only)."""

from __future__ import annotations

import math
from pathlib import Path

from capcli.errors import UserError


def plot_encoders(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """A PNG scatter of images/s (y) against parameters in millions (x), one labelled dot per row.

    Pillow only. Rows without both numbers are skipped.
    """
    from PIL import Image, ImageDraw, ImageFont

    pts = [(float(r["params_m"]), float(r["images_per_s"]), str(r["encoder"])) for r in rows
           if r.get("params_m") is not None and r.get("images_per_s") is not None]
    if not pts:
        raise UserError("nothing to plot: no row has both params_m and images_per_s")
    w, h = 900, 600
    left, right, top, bottom = 90, 40, 50, 70
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def axis(values: list[float]) -> tuple[float, float, list[float]]:
        lo, hi = 0.0, max(values)
        hi = hi * 1.1 if hi > 0 else 1.0
        raw = hi / 5
        mag = 10 ** math.floor(math.log10(raw))
        tick = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
        ticks = [i * tick for i in range(int(hi / tick) + 1)]
        return lo, ticks[-1] + tick if ticks[-1] < hi else ticks[-1], ticks

    x0, x1, xt = axis([p[0] for p in pts])
    y0, y1, yt = axis([p[1] for p in pts])

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in xt:
        px, _ = to_px(t, y0)
        draw.line([px, h - bottom, px, h - bottom + 5], fill="black")
        draw.line([px, top, px, h - bottom], fill=(230, 230, 230))
        draw.text((px - 10, h - bottom + 8), f"{t:g}", fill="black", font=font)
    for t in yt:
        _, py = to_px(x0, t)
        draw.line([left - 5, py, left, py], fill="black")
        draw.line([left, py, w - right, py], fill=(230, 230, 230))
        draw.text((8, py - 6), f"{t:g}", fill="black", font=font)
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for x, y, label in pts:
        px, py = to_px(x, y)
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=(31, 119, 180), outline="black")
        draw.text((px + 8, py - 14), label, fill="black", font=font)
    draw.text((left, h - 25), "parameters (millions)", fill="black", font=font)
    draw.text((8, 15), "images/s (encoder inference)", fill="black", font=font)
    if title:
        draw.text((left + 250, 15), title, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
STUDY_PANELS = (("bleu4", "BLEU-4 (x100)", 100.0), ("cider", "CIDEr-D", 1.0), ("top5", "top-5 accuracy (%)", 100.0))


def plot_study(rows: list[dict], keys: list[str], path: str | Path, title: str = "") -> Path:
    """Grouped bars as the paper's figures: one panel per score (BLEU-4, CIDEr-D, top-5), one group
    per value of the grid's first key (the encoder), one bar per combination of the other keys
    (learning rate x teacher forcing), with a legend. Pillow only; missing scores are left out."""
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise UserError("nothing to plot: the study has no rows")
    group_key, series_keys = keys[0], keys[1:]
    groups = list(dict.fromkeys(str(r[group_key]) for r in rows))
    label = lambda r: ", ".join(f"{k.split('.')[-1]}={r[k]}" for k in series_keys) or "run"  # noqa: E731
    series = list(dict.fromkeys(label(r) for r in rows))
    value = {(str(r[group_key]), label(r)): r for r in rows}
    font = ImageFont.load_default()
    panel_w = max(360, 60 + len(groups) * (len(series) * 16 + 24))
    panel_h, top, bottom, left = 330, 40, 70, 56
    legend_h = 18 * len(series) + 16
    w, h = panel_w * len(STUDY_PANELS), panel_h + legend_h + 30
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((10, 6), title, fill="black", font=font)
    for p, (metric, name, scale) in enumerate(STUDY_PANELS):
        x0 = p * panel_w + left
        x1 = (p + 1) * panel_w - 14
        y0, y1 = 30 + top, 30 + panel_h - bottom
        vals = [r[metric] * scale for r in rows if isinstance(r.get(metric), (int, float))]
        hi = max(vals) if vals else 1.0
        hi = hi * 1.15 if hi > 0 else 1.0
        raw = hi / 5
        mag = 10 ** math.floor(math.log10(raw))
        tick = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
        draw.text((x0, 30 + 12), name, fill="black", font=font)
        for i in range(int(hi / tick) + 1):
            y = y1 - i * tick / hi * (y1 - y0)
            draw.line([x0, y, x1, y], fill=(230, 230, 230))
            draw.text((x0 - 40, y - 6), f"{i * tick:g}", fill="black", font=font)
        draw.line([x0, y0, x0, y1], fill="black")
        draw.line([x0, y1, x1, y1], fill="black")
        slot = (x1 - x0) / max(len(groups), 1)
        bar = min(22.0, (slot - 16) / max(len(series), 1))
        for g, group in enumerate(groups):
            gx = x0 + g * slot + (slot - bar * len(series)) / 2
            for s, name_s in enumerate(series):
                r = value.get((group, name_s))
                if r is None or not isinstance(r.get(metric), (int, float)):
                    continue
                v = r[metric] * scale
                bx = gx + s * bar
                draw.rectangle([bx, y1 - v / hi * (y1 - y0), bx + bar - 2, y1], fill=PALETTE[s % len(PALETTE)])
            text = group if len(group) * 6 < slot else group[: max(3, int(slot // 6) - 1)] + "."
            draw.text((x0 + g * slot + slot / 2 - len(text) * 3, y1 + 6), text, fill="black", font=font)
    ly = 30 + panel_h - 20
    draw.text((left, ly), f"groups: {group_key}; bars:", fill="black", font=font)
    for s, name_s in enumerate(series):
        y = ly + 18 * (s + 1)
        draw.rectangle([left, y, left + 12, y + 10], fill=PALETTE[s % len(PALETTE)])
        draw.text((left + 18, y - 1), name_s, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
