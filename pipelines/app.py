"""``tagclip app``: a local web page to tag and segment your own images with your own words.

The page is a face on the library, nothing more: every number on it comes from
:class:`pipelines.segment.Segmenter` (TagCLIP's :class:`~tagclip.tagger.Tagger`, then CLIP-ES's
CAMs), the code behind ``tagclip tag`` and ``tagclip segment``, and an image is read as those
commands read it (:func:`toolkit.images.open_image`, larger images downscaled to ``--max_side``).

Two layers:

* :class:`AppEngine` knows no web framework: the model (loaded once), a small in-memory cache of
  vocabularies (their text features are encoded once), one request = files + words ->
  :class:`AppResult` (messages, tag bars, pictures, a zip of results). The Python tests call it
  directly.
* :func:`build_page` wraps it in a Gradio ``Blocks`` page; Gradio is an optional extra
  (``pip install -e ".[app]"``), imported only by ``tagclip app``.

Choices where a page differs from a command: the masks and CAMs are made at the size the image
was read at (at most ``--max_side`` on its longer side, where ``tagclip segment`` writes them at
the file's own size); one request's images run one after another, so the progress bar moves per
image; requests wait in Gradio's queue and run one at a time on the one model.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from clip.loading import load_model
from clip.preprocess import to_model_input
from clip_es.cam_files import save_cam
from clip_es.masks import write_label_png
from tagclip.metrics import relative_thresholds
from tagclip.registry import DATASETS, get_dataset
from tagclip.tagger import check_vocabulary
from toolkit.cli import add_max_side_argument, add_model_arguments, settle_precision
from toolkit.errors import InputError, short_reason, shown_path
from toolkit.files import atomic_writer, write_text_atomic
from toolkit.images import open_image
from toolkit.vis import cam_overlays, mask_overlay, safe_name

from .segment import Segmenter

DEFAULT_HOST = "127.0.0.1"    # localhost only, unless --host says otherwise
DEFAULT_PORT = 7860           # Gradio's usual port
APP_EXTRA = 'pip install -e ".[app]"'
VOCABULARY_CACHE_SIZE = 8     # vocabularies whose text features stay in memory between requests
KEEP_REQUESTS = 16            # result folders kept on disk (older ones are removed as new requests come)
QUEUE_SIZE = 64               # requests that may wait in the queue; more are refused by Gradio
MAX_UPLOAD = "200mb"          # one uploaded file at most (the image reader's pixel limit still applies)
MASK_PREVIEW_SIDE = 560       # the page's previews, longer side in pixels (full size in the zip's files)
CAM_PREVIEW_SIDE = 240
PREVIEW_QUALITY = 90          # JPEG quality of the previews
MAX_BARS = 10                 # classes shown as bars per image, past the tags themselves
CUSTOM_VOCABULARY = "your own words"
# The vocabulary picker: a dataset's class names and background words, and its TagCLIP settings.
VOCABULARIES = {"VOC 2007": "voc2007", "COCO 2014": "coco2014", "COCO-Stuff": "cocostuff"}
DEFAULT_SETTINGS = "voc2007"  # the thresholds of `tagclip tag` without --dataset
RESULTS_JSON = "results.json"
RESULTS_ZIP = "tagclip_results.zip"

Progress = Callable[[float, str], None]


def split_words(text: Optional[str]) -> list[str]:
    """Words typed in a box: separated by commas or new lines, blanks dropped (as the commands'
    comma lists; the page never reads a file named in a box)."""
    return [w.strip() for line in (text or "").splitlines() for w in line.split(",") if w.strip()]


def page_vocabulary(classes: Optional[str], background: Optional[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The class names and background words of a request; ValueError with the message the
    page shows for no class name, a word listed twice, or a background word that is a class."""
    names = split_words(classes)
    if not names:
        raise ValueError("no class names given: type them as a comma list (cat, dog, sofa) or pick a vocabulary")
    try:
        names, _ = check_vocabulary(names)
    except ValueError as err:
        raise ValueError(f"class names: {err}") from None
    try:
        return check_vocabulary(names, split_words(background))
    except ValueError as err:
        raise ValueError(f"background words: {err}") from None


def vocabulary_words(choice: str) -> tuple[str, str, str]:
    """The picker's choice as (class names, background words, settings) for the page's boxes."""
    dataset = get_dataset(VOCABULARIES[choice])
    return ", ".join(dataset.class_names), ", ".join(dataset.background), dataset.name


@dataclass
class ImageResult:
    """One image of a request."""
    image_id: str
    file_name: str
    size_hw: tuple[int, int]          # the size it was read at (the masks' and CAMs' size)
    scores: dict[str, float]          # every class, vocabulary order
    tags: list[str]                   # TagCLIP's tags, best first
    threshold: float                  # the image's relative threshold: tags score above it
    overlay: Path                     # the mask over the image, with its legend
    cam_pictures: list[tuple[str, Path]]  # (tag, its heat map), best first


@dataclass
class AppResult:
    """What one request gives the page."""
    images: list[ImageResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)   # one line per file that could not be read
    archive: Optional[Path] = None                    # masks, CAM files and results.json
    summary: dict = field(default_factory=dict)       # results.json
    seconds: float = 0.0


class AppEngine:
    """The model behind the page and what one request does with it (no web framework here).

    ``max_side``: larger images are downscaled to it (as ``--max_side``); ``workdir``: where each
    request's results go (the last :data:`KEEP_REQUESTS` requests are kept). Requests are run one
    at a time (a lock), whoever calls.
    """

    def __init__(self, model, workdir, max_side: Optional[int], model_name: str = "",
                 use_text_cache: bool = True):
        self.model = model
        self.workdir = Path(workdir)
        self.max_side = max_side
        self.model_name = model_name
        self.use_text_cache = use_text_cache
        self._segmenters: OrderedDict[tuple, Segmenter] = OrderedDict()
        self._lock = threading.Lock()
        self._requests = 0

    def segmenter(self, names: Sequence[str], background: Sequence[str], settings: str) -> Segmenter:
        """The :class:`Segmenter` of a vocabulary and dataset settings, built (text encoded) on
        first use and kept for the next :data:`VOCABULARY_CACHE_SIZE` vocabularies."""
        key = (tuple(names), tuple(background), settings)
        if key in self._segmenters:
            self._segmenters.move_to_end(key)
            return self._segmenters[key]
        dataset = get_dataset(settings)
        made = Segmenter(self.model, names, background, params=dataset.params,
                         label_threshold=dataset.label_rel_threshold, use_text_cache=self.use_text_cache)
        self._segmenters[key] = made
        while len(self._segmenters) > VOCABULARY_CACHE_SIZE:
            self._segmenters.popitem(last=False)
        return made

    def run(self, files: Sequence[str], classes: str, background: str = "", settings: str = DEFAULT_SETTINGS,
            crf: bool = False, progress: Optional[Progress] = None) -> AppResult:
        """Tag and segment ``files`` (paths; an unreadable one becomes a line of
        :attr:`AppResult.errors`). ValueError, with the page's message, for a bad vocabulary,
        unknown settings or no files."""
        names, words = page_vocabulary(classes, background)
        if settings not in DATASETS:
            raise ValueError(f"unknown settings {settings!r}; choose one of {', '.join(DATASETS)}")
        if not files:
            raise ValueError("no image given: upload or drop one or more images")
        report = progress or (lambda fraction, text: None)
        with self._lock:
            start = time.perf_counter()
            report(0.0, "text features")
            segmenter = self.segmenter(names, words, settings)
            out = self._new_request_folder()
            result = AppResult()
            ids: set[str] = set()
            for i, path in enumerate(files):
                name = Path(path).name
                report(i / len(files), f"image {i + 1} of {len(files)}: {name}")
                try:
                    img = open_image(path, max_side=self.max_side)
                except InputError as err:
                    result.errors.append(f"{name}: {err.problem}")
                    continue
                image_id = _unique(safe_name(Path(name).stem), ids)
                result.images.append(self._one_image(segmenter, img, image_id, name, out, crf))
            report(1.0, "writing the results")
            result.summary = self._summary(segmenter, settings, crf, result)
            write_text_atomic(out / RESULTS_JSON, json.dumps(result.summary, indent=1) + "\n")
            result.archive = _zip_results(out, [out / RESULTS_JSON, *sorted((out / "masks").glob("*.png")),
                                                *sorted((out / "cams").glob("*.npy"))])
            result.seconds = time.perf_counter() - start
        return result

    def _one_image(self, segmenter: Segmenter, img, image_id: str, name: str, out: Path,
                   crf: bool) -> ImageResult:
        tagger = segmenter.tagger
        tensor = to_model_input(img, patch_size=tagger.patch_size)
        size_hw = (img.height, img.width)
        row = tagger.scores([tensor])[0]
        rgb = img.convert("RGB")
        crf_bgr = np.ascontiguousarray(np.asarray(rgb)[..., ::-1]) if crf else None
        seg = segmenter.segment(tensor, size_hw, row, crf_bgr)
        save_cam(out / "cams" / f"{image_id}.npy", seg.keys, seg.attn_highres)
        write_label_png(out / "masks" / f"{image_id}.png", seg.label_map)
        names = segmenter.class_names
        overlay = out / "overlays" / f"{image_id}.png"
        mask_overlay(rgb, seg.label_map, segmenter.eval_config.class_names, overlay)
        pictures = cam_overlays(rgb, seg.keys, seg.attn_highres, names, out / "cam_pictures", image_id)
        by_class = dict(zip((int(k) for k in seg.keys), pictures))
        threshold = float(relative_thresholds(row[None], tagger.label_threshold)[0])
        tags = sorted(seg.labels, key=lambda c: -float(row[c]))
        return ImageResult(image_id, name, size_hw, dict(zip(names, row.tolist())), [names[c] for c in tags],
                           threshold, overlay, [(names[c], by_class[c]) for c in tags])

    def _summary(self, segmenter: Segmenter, settings: str, crf: bool, result: AppResult) -> dict:
        names = segmenter.class_names
        return {
            "model": self.model_name,
            "settings": settings,
            "classes": list(names),
            "background": list(segmenter.tagger.background),
            "relative_threshold": segmenter.tagger.label_threshold,
            "crf": bool(crf),
            "max_side": self.max_side,
            "mask_values": {"background": 0, **{n: i + 1 for i, n in enumerate(names)}},
            "images": {r.image_id: {"file": r.file_name, "size_hw": list(r.size_hw), "tags": r.tags,
                                    "threshold": r.threshold, "scores": r.scores} for r in result.images},
            "errors": result.errors,
        }

    def _new_request_folder(self) -> Path:
        """A fresh folder for this request's files; the oldest beyond :data:`KEEP_REQUESTS` go."""
        self._requests += 1
        out = self.workdir / f"request-{self._requests:06d}"
        out.mkdir(parents=True)
        done = sorted(p for p in self.workdir.glob("request-*") if p.is_dir())
        for old in done[:-KEEP_REQUESTS]:
            shutil.rmtree(old, ignore_errors=True)
        return out


def _unique(image_id: str, taken: set[str]) -> str:
    """``image_id``, or ``image_id-2``, ``-3``, ... when two uploads share a name."""
    candidate, n = image_id, 1
    while candidate in taken:
        n += 1
        candidate = f"{image_id}-{n}"
    taken.add(candidate)
    return candidate


def _zip_results(out: Path, files: Sequence[Path]) -> Path:
    """One zip of ``files`` (names relative to ``out``), written atomically."""
    target = out / RESULTS_ZIP
    with atomic_writer(target) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, path.relative_to(out).as_posix())
    return target


# ----------------------------------------------------------------------------- what the page shows

def tag_bars_html(image: ImageResult) -> str:
    """One image's classes as bars, best first: the tags (coloured), then up to
    :data:`MAX_BARS` more; bar length relative to the image's best score, the relative
    threshold marked on every bar. Class names are escaped."""
    ranked = sorted(image.scores.items(), key=lambda kv: -kv[1])
    top = max(ranked[0][1], np.finfo(np.float32).tiny)
    shown = ranked[:len(image.tags) + MAX_BARS]
    marker = min(100.0, max(0.0, 100.0 * image.threshold / top))
    rows = []
    for name, score in shown:
        kind = "tc-tag" if name in image.tags else "tc-other"
        rows.append(
            f'<div class="tc-row {kind}"><span class="tc-name">{html.escape(name)}</span>'
            f'<span class="tc-track"><span class="tc-bar" style="width:{100.0 * max(score, 0.0) / top:.2f}%">'
            f'</span><span class="tc-thr" style="left:{marker:.2f}%"></span></span>'
            f'<span class="tc-score">{score:.3f}</span></div>')
    more = len(ranked) - len(shown)
    hidden = f"; {more} more classes not shown" if more else ""
    return (f'<div class="tc-bars">{"".join(rows)}<div class="tc-note">tags in colour; red line: the threshold '
            f'{image.threshold:.3f} (bars relative to the best score{hidden})</div></div>')


def preview_src(path: Path, side: int) -> str:
    """A picture as a JPEG ``data:`` URL, at most ``side`` pixels on its longer side (the page
    shows previews; the full pictures are files)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((side, side), Image.BICUBIC)
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=PREVIEW_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def results_html(result: AppResult) -> str:
    """Every image of a request: its tags as bars, its mask over the picture with the legend,
    one heat map per tag. File and class names are escaped."""
    parts = []
    for image in result.images:
        name = html.escape(image.file_name)
        cams = "".join(
            f'<figure class="tc-cam"><img src="{preview_src(path, CAM_PREVIEW_SIDE)}" alt="CAM of {html.escape(tag)}">'
            f'<figcaption>{html.escape(tag)}</figcaption></figure>' for tag, path in image.cam_pictures)
        parts.append(
            f'<section class="tc-image"><div class="tc-title">{name}: {html.escape(", ".join(image.tags))}</div>'
            f'<div class="tc-body">{tag_bars_html(image)}'
            f'<figure class="tc-mask"><img src="{preview_src(image.overlay, MASK_PREVIEW_SIDE)}" '
            f'alt="mask of {name}"><figcaption>mask (legend below the picture)</figcaption></figure></div>'
            f'<div class="tc-cams">{cams}</div></section>')
    return '<div class="tc-results">' + "".join(parts) + "</div>"


def status_markdown(result: AppResult) -> str:
    """The request's one-paragraph report: what was done, and every file that could not be read."""
    lines = [f"Tagged and segmented {len(result.images)} image(s) in {result.seconds:.1f} s."]
    if result.errors:
        lines.append(f"**{len(result.errors)} file(s) could not be read:**")
        lines += [f"- {html.escape(e)}" for e in result.errors]
    return "\n".join(lines)


PAGE_CSS = """
.tc-image { margin: 0 0 18px 0; padding-bottom: 12px; border-bottom: 1px solid #e5e7eb; }
.tc-title { font-weight: 600; margin-bottom: 6px; }
.tc-body { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.tc-bars { flex: 1 1 320px; min-width: 280px; }
.tc-row { display: flex; align-items: center; gap: 8px; font-size: 13px; line-height: 18px; }
.tc-name { width: 9em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; text-align: right; }
.tc-track { position: relative; flex: 1; height: 12px; background: #eceff3; border-radius: 2px; }
.tc-bar { position: absolute; left: 0; top: 0; bottom: 0; background: #9aa5b1; border-radius: 2px; }
.tc-tag .tc-bar { background: #2f7bd8; }
.tc-tag .tc-name { font-weight: 600; }
.tc-thr { position: absolute; top: -2px; bottom: -2px; width: 2px; background: #d0342c; }
.tc-score { width: 3.5em; font-variant-numeric: tabular-nums; }
.tc-note { font-size: 12px; color: #6b7280; margin-top: 2px; }
.tc-results figure { margin: 0; }
.tc-results figcaption { font-size: 12px; color: #4b5563; text-align: center; }
.tc-mask img { max-width: 100%; display: block; }
.tc-cams { display: flex; flex-wrap: wrap; gap: 8px; margin-top: 8px; }
.tc-cam img { display: block; max-width: 240px; }
"""

INTRO = """# TagCLIP: tag and segment your images
Upload images, type your class names (or pick a dataset vocabulary), press **Run**. TagCLIP tags
each image (training-free, no labels needed); CLIP-ES turns the tags into heat maps and a mask.
"""


def build_page(engine: AppEngine):
    """The Gradio ``Blocks`` page around ``engine``."""
    import gradio as gr

    def run(files, classes, background, settings, crf, progress=gr.Progress()):
        paths = [f if isinstance(f, str) else f.name for f in (files or [])]
        try:
            result = engine.run(paths, classes, background, settings, crf,
                                progress=lambda fraction, text: progress(fraction, desc=text))
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return (status_markdown(result), results_html(result), str(result.archive) if result.archive else None,
                result.summary)

    def pick(choice):
        if choice == CUSTOM_VOCABULARY:
            return gr.update(), gr.update(), gr.update()
        return vocabulary_words(choice)

    with gr.Blocks(title="TagCLIP", analytics_enabled=False) as page:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images (one or several)", file_count="multiple", elem_id="tc-files")
                vocabulary = gr.Dropdown([CUSTOM_VOCABULARY, *VOCABULARIES], value=CUSTOM_VOCABULARY,
                                         label="Vocabulary", elem_id="tc-vocabulary")
                classes = gr.Textbox(label="Class names (comma list)", placeholder="cat, dog, sofa", lines=2,
                                     elem_id="tc-classes")
                background = gr.Textbox(label="Background words (optional: compete, never reported)",
                                        placeholder="floor, wall, sky", elem_id="tc-background")
                with gr.Row():
                    settings = gr.Dropdown(list(DATASETS), value=DEFAULT_SETTINGS, label="Thresholds of",
                                           elem_id="tc-settings")
                    crf = gr.Checkbox(label="dense CRF on the masks", value=False, elem_id="tc-crf")
                button = gr.Button("Run", variant="primary", elem_id="tc-run")
                status = gr.Markdown(label="Status", elem_id="tc-status")
                download = gr.File(label="Results: palette masks, CAM files, results.json", elem_id="tc-download")
            with gr.Column(scale=2):
                shown = gr.HTML(label="Results", elem_id="tc-results")
                with gr.Accordion("Scores as JSON", open=False):
                    summary = gr.JSON(label="Scores", elem_id="tc-json")
        vocabulary.change(pick, vocabulary, [classes, background, settings], api_name=False)
        button.click(run, [files, classes, background, settings, crf], [status, shown, download, summary],
                     api_name="run")
    return page


# ----------------------------------------------------------------------------- the command

def add_app_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default %(default)s: this machine only; 0.0.0.0 opens it to "
                        "your network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default %(default)s)")
    add_max_side_argument(p)
    p.add_argument("--no_text_cache", action="store_true", help="do not read or write cached text features")


def check_address(host: str, port: int) -> None:
    """InputError naming ``host:port`` when the app could not listen there (a taken port, an
    address that is not this machine's); found by binding it for a moment."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6, as the name says
        with socket.create_server((host, port), family=family):
            pass
    except socket.gaierror as err:  # a name that does not resolve
        raise InputError(f"{host}:{port}", f"cannot listen there ({short_reason(err)}); choose another --host"
                         ) from None
    except OSError as err:  # create_server appends the address to strerror; the message names it already
        reason = os.strerror(err.errno) if err.errno else short_reason(err)
        raise InputError(f"{host}:{port}", f"cannot listen there ({reason}); choose another --port or --host") from None


def run_app(args) -> int:
    started = time.perf_counter()
    try:
        import gradio as gr
    except ImportError:
        raise InputError("gradio", f"tagclip app needs Gradio, an optional extra: {APP_EXTRA}") from None
    check_address(args.host, args.port)  # before the model loads: a taken port is known at once
    settle_precision(args)
    model = load_model(args.model_path, args.device, args.precision, args.model_cache, args.allow_checkpoint_code,
                       args.arch)
    with tempfile.TemporaryDirectory(prefix="tagclip-app-") as workdir:
        engine = AppEngine(model, workdir, args.max_side, model_name=str(args.model_path),
                           use_text_cache=not args.no_text_cache)
        page = build_page(engine)
        page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
        try:
            _, url, _ = page.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True,
                                    quiet=True, ssr_mode=False, allowed_paths=[workdir], max_file_size=MAX_UPLOAD,
                                    css=PAGE_CSS, theme=gr.themes.Default(font=["system-ui", "sans-serif"],
                                                                          font_mono=["monospace"]))
        except OSError:  # Gradio's "Cannot find empty port": taken since check_address
            raise InputError(f"{args.host}:{args.port}", "cannot listen there (the port was taken while the model "
                                                         "loaded); choose another --port") from None
        device = next(model.parameters()).device
        print(f"tagclip app: {url} (model {shown_path(args.model_path)} on {device}, ready in "
              f"{time.perf_counter() - started:.1f} s; Ctrl+C stops it)", flush=True)
        try:
            page.block_thread()
        finally:
            page.close()
    return 0

