"""The built-in data set: scenes of 1-3 coloured shapes on textured backgrounds, with captions.

It needs no download and a tiny captioner learns it on a CPU in minutes, so every caption is
predictable from the pixels (and true of them), yet the five captions of an image vary in wording.

Scene specs and rendering are separate. :func:`make_scenes` draws each scene's spec (plain
JSON-able data) and its five captions from ``random.Random(f"{seed}:{i}")`` alone, so scene ``i``
depends only on ``(seed, i)``: a resumed, partial or parallel render gives the same result.
:func:`render` turns a spec into pixels at any size; it is a module-level function that
``write_dataset`` can send to worker processes.

Geometry. The image is a 3 x 3 grid of cells; each shape sits in its own cell (jittered so it
never leaves the cell), so shapes never overlap and every relation in a caption follows from the
cells: "A to the left of B" means A's column is smaller than B's, so A's x centre is smaller by at
least 0.18 of the image width; "above" likewise with rows. A shape's size is its radius as a
fraction of the image side (small 0.07, large 0.125): relative geometry, so any size from 32 to
512 px renders the same scene.

Spec::

    {"version": 1,
     "shapes": [{"kind": "circle", "colour": "red", "size": "large",
                 "x": 0.1712, "y": 0.4981, "row": 1, "col": 0, "angle": 0.0}, ...],
     "background": {"seed": 123456789}}

``x``/``y`` are the normalised centre (0..1, y down), ``row``/``col`` the grid cell, ``angle``
the rotation in degrees (squares only; triangles stay upright so they stay easy to tell apart).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from capcli.data.records import Record

SPEC_VERSION = 1

# Clearly distinct hues, saturated so they stand out from the greyish backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (238, 212, 32),
    "green": (40, 165, 60),
    "blue": (38, 84, 222),
    "purple": (140, 58, 190),
}
KINDS = ("circle", "square", "triangle")
PLURALS = {k: k + "s" for k in KINDS}
SIZES = {"small": 0.07, "large": 0.125}  # radius as a fraction of the image side
GRID = 3
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
RELATIONS = ("to the left of", "to the right of", "above", "below")
POSITIONS = {
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}
CAPTIONS_PER_IMAGE = 5
MAX_CAPTION_WORDS = 16

# Every word a caption can use (the tokenizer drops the punctuation).
WORDS = frozenset(
    "a an the there is are one two three shape shapes on noisy background and to of left right "
    "above below in at top bottom middle image with picture".split()
    + list(SIZES) + list(COLOURS) + list(KINDS) + list(PLURALS.values())
)

_EXTENT = 1.1  # farthest a shape reaches from its centre, in radii (triangle half-width, tilted square)
_MARGIN = 0.012  # free space kept between a shape and its cell's border, as a fraction of the side
_MAX_ANGLE = 15.0  # squares are tilted by up to this many degrees
_NUM_SHAPES = ((1, 0.25), (2, 0.4), (3, 0.35))  # how many shapes a scene has, with weights
_SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down: anti-aliased edges
_NOISE_SIGMA = 6.0  # per-pixel Gaussian noise over the whole image (0..255 scale)
_TEXTURE_AMPLITUDE = 12.0  # low-frequency blotches on the background


# ---------------------------------------------------------------------------------------------
# Scene specs


def _scene_spec(rng: random.Random) -> dict:
    n = rng.choices([k for k, _ in _NUM_SHAPES], weights=[w for _, w in _NUM_SHAPES])[0]
    cells = rng.sample(range(GRID * GRID), n)
    cells.sort()  # reading order: top row first, left to right
    shapes: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    for cell in cells:
        row, col = divmod(cell, GRID)
        while True:  # no two shapes of a scene alike in kind, colour and size
            kind, colour, size = rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(list(SIZES))
            if (kind, colour, size) not in seen:
                seen.add((kind, colour, size))
                break
        half = 0.5 / GRID
        lim = max(0.0, half - SIZES[size] * _EXTENT - _MARGIN)
        x = (col + 0.5) / GRID + rng.uniform(-lim, lim)
        y = (row + 0.5) / GRID + rng.uniform(-lim, lim)
        angle = rng.uniform(-_MAX_ANGLE, _MAX_ANGLE) if kind == "square" else 0.0
        shapes.append({"kind": kind, "colour": colour, "size": size, "x": round(x, 4),
                       "y": round(y, 4), "row": row, "col": col, "angle": round(angle, 1)})
    return {"version": SPEC_VERSION, "shapes": shapes, "background": {"seed": rng.getrandbits(48)}}


def relations(a: dict, b: dict) -> list[str]:
    """Every relation phrase that is true of shape ``a`` with respect to shape ``b``."""
    rels = []
    if a["col"] < b["col"]:
        rels.append("to the left of")
    if a["col"] > b["col"]:
        rels.append("to the right of")
    if a["row"] < b["row"]:
        rels.append("above")
    if a["row"] > b["row"]:
        rels.append("below")
    return rels


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(shape: dict, rng: random.Random, size: str = "random", shapes: list[dict] = ()) -> str:
    """An indefinite noun phrase for one shape: "a (large) red circle". The size is always named
    when another shape of ``shapes`` has the same colour and kind."""
    words = [shape["colour"], shape["kind"]]
    twin = any(s is not shape and s["colour"] == shape["colour"] and s["kind"] == shape["kind"]
               for s in shapes)
    if twin or size == "always" or (size == "random" and rng.random() < 0.5):
        words.insert(0, shape["size"])
    return " ".join([_article(words[0])] + words)


def _definite(shape: dict, shapes: list[dict], rng: random.Random) -> str:
    """"the circle" / "the red circle" / "the small red circle": a description that picks out
    ``shape`` alone among ``shapes`` (size + colour + kind always does: no two shapes share all three)."""
    options = []
    for keys in (("kind",), ("colour", "kind"), ("size", "colour", "kind")):
        if sum(all(s[k] == shape[k] for k in keys) for s in shapes) == 1:
            options.append("the " + " ".join(shape[k] for k in keys))
    return rng.choice(options)


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _count_phrase(n: int) -> str:
    return f"{COUNT_WORDS[n]} {'shape' if n == 1 else 'shapes'}"


def _cap_list(shapes: list[dict], rng: random.Random) -> str:
    n = len(shapes)
    if n == 1:
        phrase = _np(shapes[0], rng)
        return rng.choice([phrase, f"{phrase} on a noisy background", f"a picture of {phrase}"])
    size = "random" if n == 2 else rng.choice(["random", "never"])
    phrase = _join([_np(s, rng, size, shapes) for s in shapes])
    return rng.choice([f"{_count_phrase(n)}: {phrase}", phrase, f"an image with {phrase}",
                       f"a picture of {phrase}"])


def _cap_count(shapes: list[dict], rng: random.Random) -> str:
    n = len(shapes)
    verb = "is" if n == 1 else "are"
    return rng.choice([
        f"{_count_phrase(n)} on a noisy background",
        f"there {verb} {_count_phrase(n)}",
        f"there {verb} {_count_phrase(n)} on a noisy background",
        f"an image with {_count_phrase(n)}",
        f"a picture of {_count_phrase(n)}",
    ])


def _cap_summary(shapes: list[dict], rng: random.Random) -> str:
    """Exact counts of everything in the scene: "there are two red circles and one blue square"."""
    by_colour = rng.random() < 0.6
    groups: dict[tuple, int] = {}
    for s in shapes:
        key = (s["colour"], s["kind"]) if by_colour else (s["kind"],)
        groups[key] = groups.get(key, 0) + 1
    parts = []
    for key, count in groups.items():
        noun = key[-1] if count == 1 else PLURALS[key[-1]]
        parts.append(" ".join([COUNT_WORDS[count], *key[:-1], noun]))
    text = _join(parts)
    if by_colour or rng.random() < 0.5:
        first = next(iter(groups.values()))
        text = f"there {'is' if first == 1 else 'are'} {text}"
    return text


def _cap_position(shapes: list[dict], rng: random.Random) -> str:
    if len(shapes) >= 2 and rng.random() < 0.4:
        a, b = rng.sample(shapes, 2)
        return (f"{_np(a, rng, 'never', shapes)} {POSITIONS[a['row'], a['col']]} and "
                f"{_np(b, rng, 'never', shapes)} {POSITIONS[b['row'], b['col']]}")
    s = rng.choice(shapes)
    return f"{_np(s, rng)} {POSITIONS[s['row'], s['col']]}"


def _pick_relation(shapes: list[dict], rng: random.Random, used: set) -> tuple[dict, dict, str]:
    """A random (a, b, relation) true of the scene, one not in ``used`` while there is one."""
    triples = [(i, j, rel) for i in range(len(shapes)) for j in range(len(shapes)) if i != j
               for rel in relations(shapes[i], shapes[j])]  # distinct cells: never empty
    fresh = [t for t in triples if t not in used]
    i, j, rel = rng.choice(fresh or triples)
    used.add((i, j, rel))
    return shapes[i], shapes[j], rel


def _cap_relation(shapes: list[dict], rng: random.Random, used: set) -> str | None:
    if len(shapes) < 2:
        return None
    a, b, rel = _pick_relation(shapes, rng, used)
    return f"{_np(a, rng, 'random', shapes)} {rel} {_np(b, rng, 'random', shapes)}"


def _cap_definite(shapes: list[dict], rng: random.Random, used: set) -> str | None:
    if len(shapes) < 2:
        return None
    a, b, rel = _pick_relation(shapes, rng, used)
    return f"{_definite(a, shapes, rng)} is {rel} {_definite(b, shapes, rng)}"


_FAMILIES = {
    "list": _cap_list, "count": _cap_count, "summary": _cap_summary, "position": _cap_position,
    "relation": _cap_relation, "definite": _cap_definite,
}


def _captions(shapes: list[dict], rng: random.Random) -> list[str]:
    if len(shapes) == 1:
        plan = ["list", "count", "summary", "position", rng.choice(["list", "position", "count"])]
        fallback = ["list", "position", "count", "summary"]
    else:
        plan = ["list", "count", "relation", rng.choice(["relation", "definite"]),
                rng.choice(["summary", "position", "definite", "relation"])]
        fallback = ["relation", "definite", "position", "summary", "list", "count"]
    out: list[str] = []
    used: set = set()  # (a, b, relation) triples already described
    for family in plan:
        for attempt in range(24):  # a varied wording first; other families if this one is spent
            fam = family if attempt < 8 else fallback[attempt % len(fallback)]
            fn = _FAMILIES[fam]
            cap = fn(shapes, rng, used) if fam in ("relation", "definite") else fn(shapes, rng)
            if cap is not None and cap not in out and len(cap.split()) <= MAX_CAPTION_WORDS:
                out.append(cap)
                break
    while len(out) < CAPTIONS_PER_IMAGE:  # not reached in practice; keeps the count exact
        out.append(out[len(out) % max(len(out), 1)] if out else _cap_count(shapes, rng))
    return out


def make_scene(i: int, seed: int = 0) -> tuple[dict, list[str]]:
    """Scene ``i`` of the data set with ``seed``: its spec and its five captions."""
    rng = random.Random(f"{seed}:{i}")
    spec = _scene_spec(rng)
    return spec, _captions(spec["shapes"], rng)


def make_scenes(n: int, seed: int = 0) -> list[tuple[dict, list[str]]]:
    """``n`` scenes: (spec, five captions) each; scene ``i`` depends only on ``(seed, i)``."""
    return [make_scene(i, seed) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Rendering


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A soft two-colour gradient of tinted greys plus low-frequency blotches, float32 (S, S, 3)."""
    c0 = rng.uniform(115, 205) + rng.uniform(-18, 18, 3)
    c1 = rng.uniform(115, 205) + rng.uniform(-18, 18, 3)
    theta = rng.uniform(0, 2 * math.pi)
    grid = rng.uniform(-1, 1, (5, 5)).astype(np.float32)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    dx, dy = math.cos(theta), math.sin(theta)
    t = coords[None, :] * dx + coords[:, None] * dy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    blotch = np.array(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)
    blotch *= np.float32(_TEXTURE_AMPLITUDE)
    bg = (c1 - c0).astype(np.float32) * t[..., None]
    bg += blotch[..., None]
    bg += c0.astype(np.float32)
    return bg


def _shape_points(shape: dict, side: float) -> list[tuple[float, float]] | None:
    cx, cy, r = shape["x"] * side, shape["y"] * side, SIZES[shape["size"]] * side
    if shape["kind"] == "square":
        h = 0.89 * r  # about the area of the circle of radius r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape["kind"] == "triangle":
        height = 1.9 * r  # upright, centred on its bounding box
        half_base = height / math.sqrt(3)
        pts = [(0.0, -height / 2), (half_base, height / 2), (-half_base, height / 2)]
    else:
        return None
    a = math.radians(shape.get("angle", 0.0))
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + px * ca - py * sa, cy + px * sa + py * ca) for px, py in pts]


def render(spec: dict, size: int, policy: str = "squash") -> np.ndarray:
    """Pixels of a scene spec: uint8 (3, size, size). ``policy`` is accepted (photo loaders
    take one) and ignored: scenes are square and drawn at the requested size."""
    size = int(size)
    if size < 8:
        raise ValueError(f"image size {size} is too small for a scene; use 32 or more")
    rng = np.random.default_rng(int(spec["background"]["seed"]))
    bg = _background(rng, size)  # consumes a fixed amount of randomness, whatever the size
    jitter = rng.uniform(-10, 10, (len(spec["shapes"]), 3))
    ss = _SUPERSAMPLE
    # Premultiplied RGBa on a transparent canvas: the box filter then gives colour x coverage,
    # and the shapes (which never overlap) composite as bg * (1 - alpha) + colour x coverage.
    layer = Image.new("RGBa", (size * ss, size * ss), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for shape, jit in zip(spec["shapes"], jitter):
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[shape["colour"]], jit)) + (255,)
        pts = _shape_points(shape, size * ss)
        if pts is None:
            cx, cy = shape["x"] * size * ss, shape["y"] * size * ss
            r = SIZES[shape["size"]] * size * ss
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(pts, fill=fill)
    if ss != 1:
        layer = layer.resize((size, size), Image.BOX)
    fg = np.asarray(layer, dtype=np.float32)
    img = bg
    img *= 1.0 - fg[..., 3:] * np.float32(1 / 255)
    img += fg[..., :3]
    img += rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(_NOISE_SIGMA)
    out = np.clip(img, 0, 255, out=img).round(out=img).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def save_png(spec: dict, path: str | Path, size: int = 96) -> Path:
    """Render ``spec`` at ``size`` and write it as a PNG (example images, tests of `caption`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render(spec, size).transpose(1, 2, 0), mode="RGB").save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Data set


def split_of(i: int, n: int) -> str:
    """80/10/10 by index: the first images train, then val, then test; at least one val and one
    test image once ``n >= 3`` (fewer images all go to train)."""
    if n < 3:
        return "train"
    n_held = max(1, round(n * 0.1))
    n_train = n - 2 * n_held
    if i < n_train:
        return "train"
    return "val" if i < n_train + n_held else "test"


def records(n: int, seed: int = 0) -> list[Record]:
    """The scenes as :class:`~capcli.data.records.Record` (``source`` is the spec); hand them to
    ``write_dataset(..., source="synthetic", loader=render, min_word_freq=1)``."""
    return [Record(split=split_of(i, n), image_id=i, file_name=f"scene_{i:06d}.png",
                   captions=list(captions), source=spec)
            for i, (spec, captions) in enumerate(make_scenes(n, seed))]
