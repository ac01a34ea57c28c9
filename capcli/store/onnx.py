"""Reading and running ONNX model folders (``capcli export RUN DIR --format onnx``, written by
:mod:`capcli.onnx`): the checks that make a bad folder one line, and :class:`OnnxCaptionModel`,
the graphs behind the interface :func:`capcli.decode.generate` drives (``encode``, ``decoder``),
with torch tensors in and out, so that ``Captioner.load(DIR, backend="onnxruntime")`` captions
through the same beam search, sampling and n-gram blocking as the torch model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from capcli.errors import UserError

INSTALL = 'pip install "capcli[onnx]"'
MIN_OPSET = 17
GRAPHS = ("encoder", "decoder_init", "decoder_step")
FILES = {name: f"{name}.onnx" for name in GRAPHS}
INT8_FILES = {"decoder_init": "decoder_init.int8.onnx", "decoder_step": "decoder_step.int8.onnx"}
ID_KEY = "capcli_export_id"  # the export id in each graph's metadata_props


def require(module: str = "onnxruntime"):
    """Import ``onnx``, ``onnxruntime`` or ``onnxscript``, or a one-line UserError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"ONNX export and the onnxruntime backend need {module}, which the core install leaves "
                        f"out: {INSTALL}") from exc


def graph_opset(model) -> int:
    """The default-domain opset of an onnx ModelProto."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _session(ort, path: Path, threads: int | None):
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No spinning between runs: torch's ops (the beam search's bookkeeping) run in between, and
    # onnxruntime's threads spinning for work would take the cores they need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types: a damaged file, an opset it cannot run
        raise UserError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]}); re-export the "
                        f"folder with `capcli export RUN {path.parent} --format onnx --overwrite`") from exc


def check_folder(folder: Path, meta: dict, vocab_size: int, *, int8: bool = False) -> dict[str, Path]:
    """The graph files of an ONNX model folder, after the checks that make a bad folder one line:
    the files exist, come from this folder's export, run at opset 17+, and score this vocabulary."""
    fix = f"re-export it with `capcli export RUN {folder} --format onnx --overwrite`"
    section = meta.get("onnx")
    if not isinstance(section, dict) or not isinstance(section.get("graphs"), dict):
        raise UserError(f"model folder {folder} has no ONNX graphs (config.json lacks its onnx section); export "
                        f"them with `capcli export RUN {folder} --format onnx --overwrite`, or use --backend torch")
    files = {name: folder / FILES[name] for name in GRAPHS}
    if int8:
        if not section.get("int8"):
            raise UserError(f"model folder {folder} has no int8 graphs; export them with "
                            f"`capcli export RUN {folder} --format onnx --quantize int8 --overwrite`")
        files.update({name: folder / file for name, file in section["int8"].items()})
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise UserError(f"model folder {folder} lacks {', '.join(missing)}; {fix}")
    onnx = require("onnx")
    for name, path in files.items():
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
            raise UserError(f"{path} is not an ONNX model ({type(exc).__name__}); {fix}") from exc
        got = graph_opset(model)
        if got < MIN_OPSET:
            raise UserError(f"{path} is at opset {got}; capcli runs opset {MIN_OPSET} or newer; {fix}")
        stamp = {p.key: p.value for p in model.metadata_props}.get(ID_KEY)
        if stamp != section.get("export_id"):
            raise UserError(f"{path} comes from another export than {folder / 'config.json'} (export id "
                            f"{stamp!r}, expected {section.get('export_id')!r}); copy the whole folder of one "
                            f"export, or {fix}")
        if name == "decoder_step":
            out = model.graph.output[0].type.tensor_type.shape.dim
            words = out[1].dim_value if len(out) > 1 else 0
            if words and words != vocab_size:
                raise UserError(f"{path} scores {words} words but {folder / 'vocab.json'} holds {vocab_size}; "
                                f"the vocabulary belongs to another model: {fix}")
    return files


class _Projection:
    """``decoder.attention`` for :func:`capcli.decode.beam_search`: ``project`` runs decoder_init."""

    def __init__(self, decoder: "OnnxDecoder"):
        self.decoder = decoder

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return self.decoder._init(feats)[2]


class OnnxDecoder:
    """The decoder interface capcli's beam search and sampling drive (``init_state``,
    ``attention.project``, ``stepper``, ``logits``), run by onnxruntime. ``logits(h)`` returns the
    log-probabilities the step that made ``h`` computed: beam search and sampling take a
    (log-)softmax of them, which a per-row shift does not change."""

    grouped = True

    def __init__(self, init_session, step_session, vocab_size: int):
        self.init_session, self.step_session = init_session, step_session
        self.vocab_size = vocab_size
        self.attention = _Projection(self)
        self._init_cache: tuple | None = None
        self._last: tuple | None = None

    def _init(self, feats: torch.Tensor):
        if self._init_cache is None or self._init_cache[0] is not feats:
            h, c, proj = self.init_session.run(None, {"features": _np(feats)})
            self._init_cache = (feats, torch.from_numpy(h), torch.from_numpy(c), torch.from_numpy(proj))
        return self._init_cache[1:]

    def init_state(self, feats: torch.Tensor):
        h, c, _ = self._init(feats)
        return h, c

    def stepper(self, rows: int = 0, steps: int = 0):
        return self.step

    def step(self, tokens, feats, enc_proj, h, c):
        logp, h, c, alpha = self.step_session.run(None, {
            "tokens": _np(tokens, np.int64), "h": _np(h), "c": _np(c), "features": _np(feats), "proj": _np(enc_proj)})
        h = torch.from_numpy(h)
        self._last = (h, torch.from_numpy(logp))
        return h, torch.from_numpy(c), torch.from_numpy(alpha)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not h:
            raise RuntimeError("OnnxDecoder.logits takes the h its last step returned")
        return self._last[1]


def _np(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)


class OnnxCaptionModel:
    """What :func:`capcli.decode.generate` needs of a model (``encode``, ``decoder``,
    ``derived_weights``), from an ONNX model folder."""

    backend = "onnxruntime"

    def __init__(self, folder: Path, meta: dict, vocab_size: int, *, int8: bool = False, threads: int | None = None):
        ort = require("onnxruntime")
        files = check_folder(folder, meta, vocab_size, int8=int8)
        threads = threads or torch.get_num_threads()  # before a decode block sets torch's to one
        self.encoder_session = _session(ort, files["encoder"], threads)
        self.decoder = OnnxDecoder(_session(ort, files["decoder_init"], threads),
                                   _session(ort, files["decoder_step"], threads), vocab_size)
        self.int8 = int8
        self.parameter_counts = dict((meta.get("model") or {}).get("parameters") or {})

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        (feats,) = self.encoder_session.run(None, {"images": _np(images, np.uint8)})
        return torch.from_numpy(feats)

    def features(self, images: torch.Tensor | None = None, regions: torch.Tensor | None = None) -> torch.Tensor:
        if regions is not None:
            raise ValueError("an ONNX model encodes images; it reads no cached features")
        return self.encode(images)

    @contextlib.contextmanager
    def derived_weights(self):
        """A block of decoding (what every caller wraps its batches in): torch runs only the beam
        search's bookkeeping here, on small tensors, so it runs on one thread; idle torch threads
        would otherwise spin between its ops and take the cores onnxruntime's threads run on."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield self
        finally:
            torch.set_num_threads(threads)

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self
