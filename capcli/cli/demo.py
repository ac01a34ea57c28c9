"""`capcli demo MODEL`: a web page to try a captioner (Gradio; the optional extra capcli[demo])."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from capcli.cli.common import BackendOpt, DebugOpt, DeviceOpt, Int8Opt, ModelAmpOpt, QuietOpt, backend_device, command
from capcli.report import console


@command(torch=True)
def demo(
    model: Annotated[str, typer.Argument(help="A trained captioner: run dir (its best.pt), checkpoint file, model folder (capcli export) or hf-hub:user/name.", show_default=False)],
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface, for other machines).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 7860,
    examples: Annotated[Optional[List[Path]], typer.Option("--examples", help="Images (files or folders) offered as one-click examples; repeatable (default: the repository's examples/images/).")] = None,
    amp: ModelAmpOpt = None,
    backend: BackendOpt = "torch",
    int8: Int8Opt = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
):
    """Serve a web page to try a captioner: drop photos, read their captions, see the attention.

    The page offers the decoding controls of `capcli caption` (beam size, n-gram blocking,
    sampling with temperature, top-k and a seed), a heat map of the attention for each word, and
    what the model is (encoder, input size, vocabulary, training data, `capcli evaluate` scores).
    The model is loaded once; requests are answered one at a time, in a queue. Ctrl-C stops it.
    Needs the extra: pip install "capcli\\[demo]".

    Examples:
      capcli demo runs/tiny                        (then open http://127.0.0.1:7860)
      capcli demo models/coco --port 8080 --examples photos/
      capcli demo hf-hub:user/coco-captioner --host 0.0.0.0
      capcli demo models/coco-onnx --backend onnxruntime     (a folder exported with --format onnx)
    """
    from capcli.api import Captioner
    from capcli.cli.common import resolve_device
    from capcli.demo import example_images, require_gradio, serve

    require_gradio()  # before the model is read: the missing extra is the first thing to say
    shown = example_images(examples)
    captioner = Captioner.load(model, resolve_device(backend_device(backend, device)), amp=amp, backend=backend,
                               int8=int8)

    def ready(url: str) -> None:
        console.print(f"capcli demo: {model} at {url}  (Ctrl-C stops it)", highlight=False, soft_wrap=True)

    serve(captioner, host=host, port=port, examples=shown, on_ready=ready)
    if not quiet:
        console.print("capcli demo: stopped", highlight=False)
