"""The page: choose or drop an image; see the top-5 classes (or the segmentation mask, or
the detected boxes), the class-activation map of every stage, the attention of the last
block of each MOAT stage, what was explained and the time taken.

Safety: it listens on 127.0.0.1 unless told otherwise; uploads larger than
`max_upload_mb` are refused by Gradio; a file that is not a readable image gets a message
on the page. The model serves one request at a time (`Explainer` holds a lock while the
attention recording is switched on); Gradio's queue lets every open tab wait its turn.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

from moat.app.exported import EXPORTED_SUFFIXES, ExportedClassifier
from moat.errors import InvalidInputError
from moat.explain.explainer import Explainer, Explanation
from moat.explain.render import boxes_image, mask_overlay, overlay
from moat.device import pick_device

TITLE = "MOAT: see what the model sees"
NOT_AN_IMAGE = "Not an image"


def _last_block_per_stage(names: list[str]) -> list[str]:
    """'stages.2.6', 'stages.3.1' out of every MOAT block name."""
    last: dict[str, str] = {}
    for name in names:
        last[name.rsplit(".", 1)[0]] = name
    return list(last.values())


def render(expl: Explanation) -> dict[str, Any]:
    """The page's outputs for one explanation."""
    gallery = [(expl.image, "input")]
    gallery += [(overlay(expl.image, m), f"{stage} map") for stage, m in expl.cams.items()]
    gallery += [(overlay(expl.image, expl.attention[b].mean(0)), f"{b} attention (head mean)")
                for b in _last_block_per_stage(list(expl.attention))]
    labels, picture = None, None
    if expl.task == "classification":
        labels = {p["label"]: p["probability"] for p in expl.predictions}
    elif expl.task == "segmentation":
        labels = {p["label"]: p["share"] for p in expl.predictions}
        picture = mask_overlay(expl.image, expl.mask)
    else:
        labels = {f"{p['label']} #{i}": p["score"] for i, p in enumerate(expl.predictions[:5])}
        picture = boxes_image(expl.image, expl.predictions, highlight=expl.box)
    status = f"Explained: {expl.target}. Time taken: {expl.seconds * 1000:.0f} ms."
    return {"labels": labels, "gallery": gallery, "picture": picture, "status": status}


def build_page(explainer: Explainer | ExportedClassifier, *, title: str = TITLE):
    """The Gradio Blocks of the page (not launched)."""
    import gradio as gr

    from moat.data.images import BadImageError, load_rgb

    def run(path: str | None, target: str | None, method: str):
        if not path:
            return None, [], None, "Choose or drop an image."
        name = Path(path).name
        try:
            rgb = load_rgb(path)
        except BadImageError as err:
            message = f"**{NOT_AN_IMAGE}:** {name} could not be read as an image ({err})."
            return None, [], None, message
        try:
            out = render(explainer.explain(rgb, target or None, method=method))
        except ValueError as err:  # e.g. no detection to explain
            return None, [], None, f"**Cannot explain {name}:** {err}"
        return out["labels"], out["gallery"], out["picture"], out["status"]

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# {title}\nModel task: **{explainer.task}**. Maps: HiResCAM per stage "
                    "(or Grad-CAM) and the attention each position receives, averaged over "
                    "its window's queries and the heads.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image", file_count="single", type="filepath",
                                 elem_id="upload")
                target = gr.Dropdown(choices=[""] + explainer.class_names, value="",
                                     label="Class to explain (empty: the predicted one)")
                method = gr.Radio(["hirescam", "gradcam"], value="hirescam", label="Method")
                button = gr.Button("Explain", variant="primary")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                labels = gr.Label(num_top_classes=5, label="Top 5", elem_id="labels")
                picture = gr.Image(label="Mask / boxes", visible=explainer.task != "classification",
                                   elem_id="picture")
        gallery = gr.Gallery(label="Explanations", columns=4, height="auto", elem_id="gallery")
        outputs = [labels, gallery, picture, status]
        upload.change(run, [upload, target, method], outputs)
        button.click(run, [upload, target, method], outputs)
    return page


def serve(*, model: str | None = None, checkpoint: str | os.PathLike | None = None,
          img_size: int | None = None, device: str = "cpu", host: str = "127.0.0.1",
          port: int = 7860, max_upload_mb: float = 10.0, block: bool = True):
    """Load the model, then serve the page until interrupted (`block=False`: return the
    launched page; `page.close()` stops it)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    if (model is None) == (checkpoint is None):
        raise InvalidInputError("give exactly one of --model NAME or --checkpoint RUN")
    if not 1 <= port <= 65535:
        raise InvalidInputError(f"--port must be in 1..65535, got {port}")
    if not max_upload_mb > 0:
        raise InvalidInputError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    check_port_free(host, port)  # before the model loads: a busy port fails in a second
    device = pick_device(device)
    if model and model.endswith(EXPORTED_SUFFIXES):
        explainer = ExportedClassifier(model, img_size=img_size)
    elif model:
        explainer = Explainer.from_name(model, device=device, img_size=img_size)
    else:
        explainer = Explainer.from_checkpoint(checkpoint, device=device, img_size=img_size)
    return launch(build_page(explainer), host=host, port=port, max_upload_mb=max_upload_mb,
                  block=block)


def launch(page, *, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 10.0,
           block: bool = True):
    """Serve a built page: one explanation at a time, every tab queued."""
    page.queue(default_concurrency_limit=1)
    try:
        page.launch(server_name=host, server_port=port,
                    max_file_size=int(max_upload_mb * 1024 * 1024),
                    prevent_thread_lock=not block, quiet=not block, footer_links=[])
    except OSError as err:
        if "port" not in str(err).lower():
            raise
        raise InvalidInputError(_busy(host, port)) from None
    return page


def check_port_free(host: str, port: int) -> None:
    """A MoatError suggesting --port when `host:port` cannot be listened on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise InvalidInputError(_busy(host, port)) from None
            raise InvalidInputError(f"cannot listen on --host {host} --port {port}: "
                                    f"{err.strerror}; choose another --host or --port") from None


def _busy(host: str, port: int) -> str:
    return (f"port {port} on {host} is already in use (another `moat app` or server?); "
            f"choose a free one with --port, e.g. --port {port + 1 if port < 65535 else 7861}")
