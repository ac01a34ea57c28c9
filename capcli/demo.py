"""`capcli demo`: a web page over :class:`capcli.Captioner`: photos in, captions and attention out.

The page is a Gradio app (the optional extra ``capcli[demo]``). Everything it shows comes from one
loaded :class:`~capcli.api.Captioner`: ``caption`` for the captions (beam search or sampling, with
the same controls as ``capcli caption``), ``caption_with_attention`` for the heat maps and
``describe`` for what the model is. There is no second inference path.

The page functions (:func:`caption_photos`, :func:`attention_for`, :func:`word_heatmap`) are plain
functions of their inputs, so they are tested without a browser; :func:`build_app` wires them to
the page and :func:`serve` runs it until Ctrl-C.
"""

from __future__ import annotations

import html
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from capcli.api import Captioner
from capcli.caption import attention_overlay
from capcli.data.images import IMAGE_SUFFIXES
from capcli.errors import UserError

log = logging.getLogger(__name__)

INSTALL = 'pip install "capcli[demo]"'
MAX_PHOTOS = 32  # photos per request: a batch the page answers in seconds on a CPU
MAX_PIXELS = 40_000_000  # 40 MP: larger images are refused before they are decoded
MAX_FILE_SIZE = "50mb"  # the upload limit Gradio enforces in the browser and the server
HEATMAP_SIZE = 384  # px: the side of the attention picture
CLOSE_SECONDS = 5.0  # the longest a stop waits for the server to close its connections
END_LABEL = "<end>"  # the last attention step: where the model looked when it ended the caption


def require_gradio():
    """The gradio module, or a one-line UserError naming the install. Gradio's usage analytics are
    off unless the user turned them on (GRADIO_ANALYTICS_ENABLED): the page calls nothing outside."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as exc:
        raise UserError(f"capcli demo needs Gradio, which the core install leaves out: {INSTALL}") from exc
    return gradio


class PhotoError(ValueError):
    """An upload the page cannot caption; its message is shown on the page."""


def check_photo(path: str | Path) -> None:
    """Raise :class:`PhotoError` (a sentence for the page) unless ``path`` is an image the model
    can read: not empty, a format Pillow decodes, at most :data:`MAX_PIXELS`, not truncated."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PhotoError(f"could not be read ({exc.strerror or exc})") from exc
    if size == 0:
        raise PhotoError("is an empty file")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise PhotoError(f"is too large ({w} x {h} px, {w * h / 1e6:.0f} MP); the demo takes photos up to "
                                 f"{MAX_PIXELS / 1e6:.0f} MP: downscale it first")
            img.load()
    except PhotoError:
        raise
    except Image.DecompressionBombError as exc:
        raise PhotoError(f"is too large ({exc}); the demo takes photos up to {MAX_PIXELS / 1e6:.0f} MP") from exc
    except (Image.UnidentifiedImageError, SyntaxError) as exc:
        kind = path.suffix.lower() or "no extension"
        raise PhotoError(f"is not an image (its name says {kind}, but Pillow cannot read what it holds); "
                         f"upload a JPEG, PNG, WebP, GIF, BMP or TIFF photo") from exc
    except (OSError, ValueError) as exc:
        raise PhotoError(f"is a damaged or truncated image ({str(exc)[:120]})") from exc


@dataclass
class Attention:
    """One photo's beam-search caption with its attention: what the word picker draws from."""

    name: str
    words: list[str]
    alphas: np.ndarray  # (T + 1, ...) one map per word, then the end
    image: np.ndarray  # uint8 (3, S, S): what the model saw

    @property
    def labels(self) -> list[str]:
        return [*self.words, END_LABEL][: len(self.alphas)]


@dataclass
class Result:
    """What the page shows after a caption request."""

    status: str  # markdown: what was done, and a line per file that could not be captioned
    rows: list[dict] = field(default_factory=list)  # one per upload: name, caption (None on error), error
    photos: list[tuple[str, str]] = field(default_factory=list)  # (name, path) of the captioned photos


def photo_name(path: str | Path) -> str:
    return Path(path).name


def caption_photos(captioner: Captioner, files: Sequence[str | Path] | None, *, beam: int = 3, block_ngrams: int = 3,
                   sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                   seed: int | None = None) -> Result:
    """Caption the uploaded ``files`` as ``capcli caption`` would with the same settings, in one
    :meth:`Captioner.caption` call. Files that are not images are reported, not captioned."""
    files = [f for f in (files or []) if f]
    if not files:
        return Result("**Add one or more photos first**: drop them on the box, or click an example.")
    if len(files) > MAX_PHOTOS:
        return Result(f"**{len(files)} photos is more than the demo captions at once ({MAX_PHOTOS})**: "
                      f"upload fewer, or caption a folder with `capcli caption MODEL FOLDER`.")
    rows, good, seen = [], [], {}
    for f in files:
        name = photo_name(f)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # two uploads of the same name: tell them apart on the page
            name = f"{name} ({seen[name]})"
        try:
            check_photo(f)
        except PhotoError as exc:
            rows.append({"name": name, "caption": None, "error": f"{name} {exc}"})
            continue
        rows.append({"name": name, "caption": None, "error": None})
        good.append((len(rows) - 1, str(f)))
    errors = [r["error"] for r in rows if r["error"]]
    if not good:
        return Result("**Nothing to caption.** " + " ".join(f"{e}." for e in errors), rows)
    start = time.perf_counter()
    captions = captioner.caption([path for _, path in good], beam=int(beam), block_ngrams=int(block_ngrams),
                                 sample={"temperature": float(temperature), "top_k": int(top_k)} if sample else None,
                                 seed=None if seed is None or not sample else int(seed))
    seconds = time.perf_counter() - start
    for (i, _), text in zip(good, captions):
        rows[i]["caption"] = text
    how = (f"sampled at temperature {float(temperature):g}" + (f", top-{int(top_k)}" if top_k else "")
           + (f", seed {int(seed)}" if seed is not None else "")) if sample else f"beam {int(beam)}"
    status = f"Captioned {len(good)} photo{'s' if len(good) != 1 else ''} in {seconds:.2f} s ({how})."
    if errors:
        status += "  \n" + "  \n".join(f"**Skipped:** {html.escape(e)}." for e in errors)
    return Result(status, rows, [(rows[i]["name"], path) for i, path in good])


def attention_for(captioner: Captioner, name: str, path: str | Path, *, beam: int = 3,
                  block_ngrams: int = 3) -> Attention:
    """The beam-search caption of one photo with one attention map per word."""
    out = captioner.caption_with_attention(str(path), beam=int(beam), block_ngrams=int(block_ngrams))
    return Attention(name, list(out["words"]), np.asarray(out["attention"]), np.asarray(out["image"]))


def word_heatmap(att: Attention, index: int, size: int = HEATMAP_SIZE) -> Image.Image:
    """The photo as the model saw it with the attention of word ``index`` over it."""
    index = max(0, min(int(index), len(att.alphas) - 1))
    base = Image.fromarray(att.image.transpose(1, 2, 0)).resize((size, size), Image.BICUBIC)
    return attention_overlay(base, att.alphas[index])


def rows_html(rows: list[dict]) -> str:
    """The captions as an HTML table (escaped): a row per upload, its caption or why it has none."""
    if not rows:
        return ""
    body = []
    for r in rows:
        if r["caption"] is not None:
            cell = f'<td class="caption">{html.escape(r["caption"])}</td>'
        else:
            cell = f'<td class="error">{html.escape(r["error"] or "")}</td>'
        body.append(f'<tr><td class="photo">{html.escape(r["name"])}</td>{cell}</tr>')
    return ('<table id="caption-table"><thead><tr><th>photo</th><th>caption</th></tr></thead><tbody>'
            + "".join(body) + "</tbody></table>")


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def facts_markdown(facts: dict) -> str:
    """What the model is (:meth:`Captioner.describe`), as the page's model card."""
    enc, p = facts["encoder"], facts["parameters"]
    init = "ImageNet-pretrained" if enc["pretrained"] else "trained from scratch"
    lines = [
        f"| model | `{html.escape(str(facts['source']))}` (capcli {facts['capcli_version']}"
        + (f", run by {facts['backend']}" if facts.get("backend", "torch") != "torch" else "") + ") |", "|---|---|",
        f"| encoder | `{enc['name']}`, {init}, {'frozen' if enc['frozen'] else 'fine-tuned'}; "
        + (f"{enc['grid']} x {enc['grid']} attention regions |" if enc["grid"] else "its own regions |"),
        f"| decoder | attention LSTM: embedding {facts['decoder']['emb_dim']}, attention {facts['decoder']['att_dim']}, "
        f"hidden {facts['decoder']['dec_dim']} |",
        f"| parameters | {_params(p['total'])} (encoder {_params(p['encoder'])}, decoder {_params(p['decoder'])}) |",
        f"| input | {facts['image_size']} x {facts['image_size']} px ({facts['resize']}) |",
        f"| vocabulary | {facts['vocab_size']} tokens; captions up to {facts['max_length']} words |",
    ]
    data = facts.get("training_data") or {}
    where = facts.get("data_dir") or data.get("dir")
    if data:
        splits = ", ".join(f"{name} {s.get('images')} photos" for name, s in (data.get("splits") or {}).items())
        lines.append(f"| trained on | {html.escape(str(data.get('source') or where))}"
                     + (f" ({splits})" if splits else "") + " |")
    elif where:
        lines.append(f"| trained on | `{html.escape(str(where))}` (its manifest was not available) |")
    out = "\n".join(lines)
    scores = facts.get("scores") or []
    if scores:
        out += ("\n\n**Scores** (`capcli evaluate`: free-running beam search against every reference)\n\n"
                "| split | beam | photos | BLEU-4 | METEOR | ROUGE-L | CIDEr-D |\n|---|---|---|---|---|---|---|\n")
        for s in scores:
            def pct(key, s=s):
                v = s.get(key)
                return f"{100 * v:.1f}" if isinstance(v, (int, float)) else "-"
            cider = s.get("cider")
            out += (f"| {s.get('split', '-')} | {s.get('beam_size', '-')} | {s.get('images', '-')} | {pct('bleu4')} | "
                    f"{pct('meteor')} | {pct('rouge_l')} | "
                    f"{f'{cider:.3f}' if isinstance(cider, (int, float)) else '-'} |\n")
    else:
        out += "\n\nNo `capcli evaluate` scores were recorded with this model."
    return out


def example_images(paths: Sequence[str | Path] | None = None) -> list[Path]:
    """The one-click examples: the images in ``paths`` (files or folders), else the ones that ship
    in the repository's examples/images/ (absent from a wheel install: then none)."""
    if paths is None:
        folder = Path(__file__).resolve().parent.parent / "examples" / "images"
        paths = [folder] if folder.is_dir() else []
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"--examples {p}: no such file or folder")
    return out[:24]


CSS = """
#caption-table { width: 100%; border-collapse: collapse; }
#caption-table td, #caption-table th { padding: 6px 10px; border-bottom: 1px solid var(--border-color-primary); text-align: left; }
#caption-table td.caption { font-size: 1.1em; }
#caption-table td.error { color: var(--error-text-color, #b91c1c); }
"""


def guarded(gr, fn: Callable) -> Callable:
    """``fn`` for a page event: a UserError becomes its sentence on the page, any other failure a
    one-line message (its traceback goes to the server's log): the page never shows a traceback."""
    def run(*args):
        try:
            return fn(*args)
        except gr.Error:
            raise
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            log.exception("capcli demo: the request failed")
            raise gr.Error(f"The request failed ({type(exc).__name__}: {str(exc)[:200]}); the server's log "
                           "has the details.", print_exception=False) from None
    run.__name__ = fn.__name__
    return run


def build_app(captioner: Captioner, examples: Sequence[Path] = ()) -> Any:
    """The page as a ``gradio.Blocks`` (not started)."""
    gr = require_gradio()
    facts = captioner.describe()

    def heatmap_update(att: Attention, index: int):
        label = att.labels[max(0, min(int(index), len(att.labels) - 1))]
        return gr.update(value=word_heatmap(att, index), label=f"Attention for '{label}' ({att.name})")

    def attention_outputs(att: Attention | None, note: str = ""):
        if att is None:
            return (gr.update(choices=[], value=None), gr.update(maximum=1, value=0, interactive=False),
                    gr.update(value=None, label="Attention"), None, note)
        labels = att.labels
        return (gr.update(choices=[(w, i) for i, w in enumerate(labels)], value=0),
                gr.update(minimum=0, maximum=max(1, len(labels) - 1), value=0, step=1, interactive=True),
                heatmap_update(att, 0), att, note or f"Caption: *{html.escape(' '.join(att.words))}*")

    def on_caption(files, beam, block, sample, temperature, top_k, seed):
        result = caption_photos(captioner, files, beam=beam, block_ngrams=block, sample=sample,
                                temperature=temperature, top_k=top_k, seed=seed if seed not in (None, "") else None)
        captions = {r["name"]: r["caption"] for r in result.rows}
        gallery = [(path, captions[name]) for name, path in result.photos]
        names = [name for name, _ in result.photos]
        att = None
        if result.photos:
            att = attention_for(captioner, *result.photos[0], beam=beam, block_ngrams=block)
        note = ("Attention of the beam-search caption (sampled captions differ)." if sample and att is not None
                else "")
        return (result.status, rows_html(result.rows), gallery,
                gr.update(choices=names, value=names[0] if names else None), result.photos,
                *attention_outputs(att, note))

    def on_photo(name, photos, beam, block):
        path = dict(photos or []).get(name)
        if path is None:
            return attention_outputs(None)
        return attention_outputs(attention_for(captioner, name, path, beam=beam, block_ngrams=block))

    def on_word(index, att):  # a word clicked: its heat map, and the slider follows
        if att is None or index is None:
            return gr.update(), gr.update()
        return heatmap_update(att, int(index)), gr.update(value=int(index))

    title = f"capcli demo: {facts['encoder']['name']} captioner"
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {html.escape(title)}\nDrop photos, choose how to decode, read the captions; pick a word "
                    "to see where the model looked for it.")
        with gr.Row():
            with gr.Column(scale=2):
                files = gr.File(label="Photos", file_count="multiple", file_types=["image"], type="filepath",
                                elem_id="photos")
                if examples:
                    gr.Examples(examples=[[[str(p)]] for p in examples], inputs=[files], label="Examples (click one)",
                                example_labels=[p.name for p in examples], elem_id="examples")
                with gr.Accordion("Decoding", open=True):
                    beam = gr.Slider(1, 10, value=3, step=1, label="Beam size (1 = greedy)", elem_id="beam")
                    block = gr.Slider(0, 5, value=3, step=1, label="Never repeat an n-gram of this size (0 = off)",
                                      elem_id="block-ngrams")
                    sample = gr.Checkbox(False, label="Sample instead of beam search (varied captions)",
                                         elem_id="sample")
                    with gr.Row(visible=False) as sampling:
                        temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature",
                                                elem_id="temperature")
                        top_k = gr.Slider(0, 100, value=0, step=1, label="Top-k (0 = all words)", elem_id="top-k")
                        seed = gr.Number(0, label="Seed (the same seed draws the same captions)", precision=0,
                                         elem_id="seed")
                run = gr.Button("Caption", variant="primary", elem_id="caption-button")
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="status")
                table = gr.HTML("", elem_id="captions")
                gallery = gr.Gallery(label="Captioned photos", columns=4, height=300, object_fit="contain",
                                     elem_id="gallery")
        with gr.Accordion("Attention: where the model looked for each word", open=True):
            with gr.Row():
                with gr.Column(scale=2):
                    photo = gr.Dropdown(choices=[], label="Photo", elem_id="attention-photo")
                    words = gr.Radio(choices=[], label="Word (click one)", elem_id="words")
                    slider = gr.Slider(0, 1, value=0, step=1, label="Word number", interactive=False,
                                       elem_id="word-slider")
                    word_note = gr.Markdown("", elem_id="word-note")
                with gr.Column(scale=3):
                    heatmap = gr.Image(label="Attention", type="pil", interactive=False, elem_id="heatmap",
                                       height=HEATMAP_SIZE)
        with gr.Accordion("About this model", open=True):
            gr.Markdown(facts_markdown(facts), elem_id="model-facts")
        photos_state, att_state = gr.State([]), gr.State(None)

        att_outputs = [words, slider, heatmap, att_state, word_note]
        run.click(guarded(gr, on_caption), [files, beam, block, sample, temperature, top_k, seed],
                  [status, table, gallery, photo, photos_state, *att_outputs])
        # new photos: the captions of the old ones go (they would read as the new ones' captions)
        files.change(lambda: ("", "", None), None, [status, table, gallery], queue=False)
        photo.input(guarded(gr, on_photo), [photo, photos_state, beam, block], att_outputs)
        words.input(guarded(gr, on_word), [words, att_state], [heatmap, slider])
        slider.release(guarded(gr, on_word), [slider, att_state], [heatmap, words])
        sample.change(lambda on: gr.update(visible=bool(on)), [sample], [sampling], queue=False)
    return app


def serve(captioner: Captioner, *, host: str = "127.0.0.1", port: int = 7860, examples: Sequence[Path] = (),
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the page until Ctrl-C (or SIGTERM): one request at a time in a queue (the page stays
    live and shows its place in the queue), the model loaded once. ``on_ready`` gets the URL."""
    gr = require_gradio()
    app = build_app(captioner, examples)
    app.queue(default_concurrency_limit=1, max_size=64)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: the page works offline
    try:
        app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, show_error=False,
                   max_file_size=MAX_FILE_SIZE, allowed_paths=sorted({str(p.parent) for p in examples}),
                   ssr_mode=False, theme=theme, css=CSS, inbrowser=False, share=False)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({str(exc).rstrip('.')}); another program may hold the "
                        "port: pass --port N") from exc
    # Ctrl-C and SIGTERM stop the page, even where SIGINT came ignored (a shell's background job)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if on_ready is not None:
            on_ready(app.local_url or f"http://{host}:{port}/")
        while True:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Gradio's close waits for the server to finish its open connections (a browser tab may
        # hold one open): give it a few seconds, then end anyway (its server thread is a daemon).
        closer = threading.Thread(target=app.close, kwargs={"verbose": False}, daemon=True)
        closer.start()
        closer.join(CLOSE_SECONDS)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
