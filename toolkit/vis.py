"""Pictures for a look at the results (``--vis_dir`` of the command-line scripts).

* :func:`draw_tags` - an image with its predicted tags and scores written on it;
* :func:`cam_overlays` - one jet heat-map overlay per CAM class;
* :func:`mask_comparison` - image | prediction | ground truth, VOC palette, colour legend;
* :func:`mask_overlay` - a label map drawn over its image, colour legend below;
* :func:`bar_chart` - per-class AP or IoU as horizontal bars (NaN shown as missing).

Matplotlib is used through :class:`matplotlib.figure.Figure` and the Agg canvas directly, so
importing this module never selects a backend or touches pyplot's global state. Every file
is written atomically (temporary file in the same folder, then renamed), and nothing here
changes the numbers of a run: the pictures only read them.
"""
from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from toolkit.files import write_bytes_atomic
from toolkit.palette import IGNORE_LABEL, voc_colormap

from .images import open_image

ImageLike = Union[str, Path, Image.Image, np.ndarray]

DPI = 100
MAX_PANEL_SIDE = 640        # mask_comparison: longer panel side, in pixels
CAM_ALPHA = 0.5             # cam_overlays: weight of the heat map
BAR_WIDTH_IN = 8.0          # bar_chart: figure width (inches at DPI)
BAR_ROW_IN = 0.22           # bar_chart: height per class
BAR_EXTRA_IN = 1.3          # bar_chart: title and axis
MISSING_COLOUR = "#b0b0b0"
ABSENT_COLOUR = "#c9a227"   # bar_chart: classes without GT pixels (not in the mIoU)
ABSENT_SUFFIX = " (not in GT)"
MIN_TAG_FONT, MAX_TAG_FONT = 10, 40   # draw_tags: text size in pixels
OUTLINE_RGB = (255, 255, 255)         # mask_comparison: region borders (no palette entry is white)
CAPTION_H = 22                        # cam_overlays: the class-name band above the picture, in pixels
COLOUR_BAR_H = 12                     # cam_overlays: the 0..1 colour bar below the picture
IGNORE_NAME = "ignore"
MASK_ALPHA = 0.5                      # mask_overlay: weight of the label colours over the image
LEGEND_ROW_H = 20                     # mask_overlay: one legend entry's height, in pixels
LEGEND_SWATCH = 14                    # mask_overlay: the colour square of a legend entry
LEGEND_ENTRY_W = 170                  # mask_overlay: one legend column's width, in pixels


# ----------------------------------------------------------------------------- helpers

def load_rgb(image: ImageLike, exif_transpose: bool = False) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an H x W x 3 uint8 array (RGB). A path is
    read as the model reads it (:func:`toolkit.images.open_image`, never downscaled), so a
    picture shows the pixels the numbers were computed on."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")
    return open_image(image, exif_transpose=exif_transpose, max_side=None).convert("RGB")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _save_image(img: Image.Image, out_path) -> Path:
    out_path = Path(out_path)
    write_bytes_atomic(out_path, _png_bytes(img))
    return out_path


def _save_figure(fig, out_path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)
    out_path = Path(out_path)
    write_bytes_atomic(out_path, buf.getvalue())
    return out_path


def safe_name(name: str) -> str:
    """A class name usable in a file name ('potted plant' -> 'potted_plant')."""
    cleaned = re.sub(r"[^0-9A-Za-z._-]+", "_", str(name)).strip("._")
    return cleaned or "class"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


# ----------------------------------------------------------------------------- tags

def draw_tags(image: ImageLike, tags: Sequence[tuple[str, float]], out_path,
              max_lines: int = 12, exif_transpose: bool = False) -> list[str]:
    """Write ``image`` (own size) as PNG with a semi-transparent box listing ``tags``; when the
    box does not fit on the image it is drawn on a black panel to the right of it instead.

    ``tags`` are ``(name, score)`` pairs; they are listed best first. Returns the text
    lines drawn (at most ``max_lines``; the last one says how many were left out).
    ``exif_transpose``: a path is read with its EXIF orientation applied, as the model read it.
    """
    base = load_rgb(image, exif_transpose).convert("RGBA")
    width, height = base.size
    # Text size follows the image, but never below what stays legible; when the list does not
    # fit on the image (small images, many tags) it goes on a panel beside the image.
    ordered = sorted(tags, key=lambda t: (-_sort_key(t[1]), str(t[0])))
    lines = [f"{name}  {score:.3f}" if _finite(score) else f"{name}  n/a" for name, score in ordered]
    if not lines:
        lines = ["(no tags)"]
    if len(lines) > max_lines:
        rest = len(lines) - (max_lines - 1)
        lines = lines[:max_lines - 1] + [f"... +{rest} more"]
    size = max(MIN_TAG_FONT, min(MAX_TAG_FONT, round(min(width, height) / 22)))
    font = _font(size)
    probe = ImageDraw.Draw(base)
    pad = max(2, size // 3)
    boxes = [probe.textbbox((0, 0), line, font=font) for line in lines]
    line_h = max(b[3] - b[1] for b in boxes) + max(1, size // 5)
    text_w = max(b[2] - b[0] for b in boxes)
    box_w = text_w + 2 * pad
    box_h = line_h * len(lines) + 2 * pad
    beside = box_w > width or box_h > height
    canvas = Image.new("RGBA", (width + box_w, max(height, box_h)), (0, 0, 0, 255)) if beside else base
    if beside:
        canvas.paste(base, (0, 0))
    x0 = width if beside else 0
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.rectangle([x0, 0, x0 + box_w - 1, box_h - 1], fill=(0, 0, 0, 255 if beside else 150))
    for i, (line, box) in enumerate(zip(lines, boxes)):
        draw.text((x0 + pad - box[0], pad + i * line_h - box[1]), line, font=font, fill=(255, 255, 255, 255))
    out = Image.alpha_composite(canvas, layer).convert("RGB")
    _save_image(out, out_path)
    return lines


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _sort_key(v) -> float:
    return float(v) if _finite(v) else -math.inf


# ----------------------------------------------------------------------------- CAM overlays

def heatmap_rgb(cam: np.ndarray) -> np.ndarray:
    """A 2-D map as jet colours (uint8 H x W x 3); values outside 0..1 are min-max scaled."""
    from matplotlib import colormaps

    m = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if m.size and (m.min() < 0 or m.max() > 1):
        lo, hi = float(m.min()), float(m.max())
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    rgba = colormaps["jet"](m)
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def cam_overlays(image: ImageLike, keys: Sequence[int], maps: np.ndarray, class_names: Sequence[str],
                 out_dir, image_id: str) -> list[Path]:
    """One ``{out_dir}/{image_id}_{classname}.png`` per CAM: jet heat map blended 50/50 with the
    image, under a caption ``{image_id}: {classname}`` and above a 0..1 colour bar.

    ``maps`` is K x H x W (float); a map of another size than the image is resized
    (bilinear) to it. Returns the files written, in ``keys`` order.
    """
    base = load_rgb(image)
    width, height = base.size
    pixels = np.asarray(base, dtype=np.float32)
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != len(keys):
        raise ValueError(f"maps of shape {maps.shape} do not match {len(keys)} keys")
    out_dir = Path(out_dir)
    written = []
    for key, cam in zip(keys, maps):
        cam = np.asarray(cam, dtype=np.float32)
        if cam.shape != (height, width):
            cam = np.asarray(Image.fromarray(cam, mode="F").resize((width, height), Image.BILINEAR))
        heat = heatmap_rgb(cam).astype(np.float32)
        blend = (1.0 - CAM_ALPHA) * pixels + CAM_ALPHA * heat
        picture = Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8), mode="RGB")
        name = class_names[int(key)] if 0 <= int(key) < len(class_names) else str(int(key))
        target = out_dir / f"{image_id}_{safe_name(name)}.png"
        written.append(_save_image(_captioned(picture, f"{image_id}: {name}"), target))
    return written


def _captioned(picture: Image.Image, caption: str) -> Image.Image:
    """``picture`` under a white band with ``caption`` and above a jet colour bar from 0 (left)
    to 1 (right), the scale of the CAM."""
    width, height = picture.size
    out = Image.new("RGB", (width, CAPTION_H + height + COLOUR_BAR_H), (255, 255, 255))
    out.paste(picture, (0, CAPTION_H))
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None].repeat(COLOUR_BAR_H, axis=0)
    out.paste(Image.fromarray(heatmap_rgb(ramp), mode="RGB"), (0, CAPTION_H + height))
    draw = ImageDraw.Draw(out)
    font = _font(CAPTION_H - 8)
    draw.text((4, 3), caption, font=font, fill=(0, 0, 0))
    draw.text((2, CAPTION_H + height), "0", font=_font(COLOUR_BAR_H - 2), fill=(255, 255, 255))
    draw.text((max(0, width - 10), CAPTION_H + height), "1", font=_font(COLOUR_BAR_H - 2), fill=(255, 255, 255))
    return out


# ----------------------------------------------------------------------------- mask comparison

def _panel_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, MAX_PANEL_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _colour_labels(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    return Image.fromarray(palette[np.asarray(labels, dtype=np.uint8)], mode="RGB")


def region_borders(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another label."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def _outlined(labels: np.ndarray, palette: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The coloured label map at ``size`` with its regions' borders in white, so that dark
    palette colours stay apart from the black background."""
    panel = np.array(_colour_labels(labels, palette).resize(size, Image.NEAREST))
    small = np.asarray(Image.fromarray(np.asarray(labels, dtype=np.uint8)).resize(size, Image.NEAREST))
    panel[region_borders(small)] = OUTLINE_RGB
    return Image.fromarray(panel, mode="RGB")


def legend_entries(labels, class_names: Sequence[str], palette: np.ndarray) -> list[tuple[int, str, tuple]]:
    """``(label, name, (r, g, b))`` of every label in ``labels``, ascending; 255 is "ignore"."""
    entries = []
    for label in sorted(set(int(v) for v in labels)):
        if label == IGNORE_LABEL:
            name = IGNORE_NAME
        elif 0 <= label < len(class_names):
            name = str(class_names[label])
        else:
            name = f"label {label}"
        entries.append((label, name, tuple(int(c) for c in palette[label])))
    return entries


def mask_overlay(image: ImageLike, labels: np.ndarray, class_names: Sequence[str], out_path) -> dict:
    """The label map over its image: the VOC palette's colours blended with weight
    :data:`MASK_ALPHA` (background, label 0, left as the image), region borders in white, at
    most :data:`MAX_PANEL_SIDE` on the longer side, above a legend of the labels present.
    Returns ``{"size": (W, H), "legend": [(label, name, (r, g, b)), ...]}``."""
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.ndim != 2:
        raise ValueError(f"a label map is 2-D, got shape {labels.shape}")
    base = load_rgb(image)
    height, width = labels.shape
    if base.size != (width, height):
        raise ValueError(f"image size {base.size} differs from the mask's {(width, height)}")
    palette = voc_colormap(256)
    size = _panel_size(width, height)
    small = np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))
    pixels = np.asarray(base.resize(size, Image.BILINEAR) if size != base.size else base, dtype=np.float32)
    colours = palette[small].astype(np.float32)
    blend = np.where((small > 0)[..., None], (1.0 - MASK_ALPHA) * pixels + MASK_ALPHA * colours, pixels)
    blend[region_borders(small)] = OUTLINE_RGB
    legend = legend_entries(np.unique(labels).tolist(), class_names, palette)
    columns = max(1, size[0] // LEGEND_ENTRY_W)
    rows = math.ceil(len(legend) / columns)
    out = Image.new("RGB", (size[0], size[1] + rows * LEGEND_ROW_H + LEGEND_ROW_H // 2), (255, 255, 255))
    out.paste(Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8), mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    font = _font(LEGEND_SWATCH - 1)
    for i, (label, name, rgb) in enumerate(legend):
        x = 4 + (i % columns) * LEGEND_ENTRY_W
        y = size[1] + LEGEND_ROW_H // 2 + (i // columns) * LEGEND_ROW_H
        draw.rectangle([x, y, x + LEGEND_SWATCH, y + LEGEND_SWATCH], fill=rgb, outline=(0, 0, 0))
        draw.text((x + LEGEND_SWATCH + 5, y), f"{label} {name}", font=font, fill=(0, 0, 0))
    _save_image(out, out_path)
    return {"size": out.size, "legend": legend}


def mask_comparison(image: Optional[ImageLike], pred: np.ndarray, gt: Optional[np.ndarray],
                    class_names: Sequence[str], out_path, title: Optional[str] = None) -> dict:
    """image | prediction | ground truth side by side (VOC palette), legend of the classes present.

    ``image`` or ``gt`` may be None (that panel is left out). Label 255 is shown in the
    palette's colour 255 as "ignore". Region borders are drawn white in the mask panels.
    Returns ``{"size": (W, H), "panels": [...], "legend": [(label, name, (r, g, b)), ...]}``
    with the picture's size in pixels.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    pred = np.asarray(pred)
    if pred.ndim != 2:
        raise ValueError(f"a label map is 2-D, got shape {pred.shape}")
    height, width = pred.shape
    palette = voc_colormap(256)
    panels: list[tuple[str, Image.Image]] = []
    pw, ph = _panel_size(width, height)
    if image is not None:
        img = load_rgb(image)
        if img.size != (width, height):
            raise ValueError(f"image size {img.size} differs from the mask's {(width, height)}")
        panels.append(("image", img.resize((pw, ph), Image.BILINEAR) if (pw, ph) != img.size else img))
    panels.append(("prediction", _outlined(pred, palette, (pw, ph))))
    present = set(np.unique(pred).tolist())
    if gt is not None:
        gt = np.asarray(gt)
        if gt.shape != pred.shape:
            raise ValueError(f"GT shape {gt.shape} differs from the prediction's {pred.shape}")
        panels.append(("ground truth", _outlined(gt, palette, (pw, ph))))
        present |= set(np.unique(gt).tolist())
    legend = legend_entries(present, class_names, palette)

    gap, top = 10, 30
    ncol = max(1, (len(panels) * (pw + gap)) // 150)
    rows = max(1, math.ceil(len(legend) / ncol))
    legend_h = 16 + 20 * rows
    fig_w = len(panels) * pw + (len(panels) + 1) * gap
    fig_h = top + ph + gap + legend_h + (24 if title else 0)
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, facecolor="white")
    y0 = legend_h + gap
    for i, (label, picture) in enumerate(panels):
        x0 = gap + i * (pw + gap)
        ax = fig.add_axes((x0 / fig_w, y0 / fig_h, pw / fig_w, ph / fig_h))
        ax.imshow(np.asarray(picture), interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        ax.set_title(label, fontsize=11, pad=4)
    if title:
        fig.text(0.5, 1 - 6 / fig_h, title, ha="center", va="top", fontsize=11)
    handles = [Patch(facecolor=np.array(rgb) / 255.0, edgecolor="black", linewidth=0.5, label=f"{lab} {name}")
               for lab, name, rgb in legend]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(ncol, len(handles)), fontsize=9,
                   frameon=False, bbox_to_anchor=(0.5, 2 / fig_h), handlelength=1.5, columnspacing=1.2)
    _save_figure(fig, out_path)
    return {"size": (fig_w, fig_h), "panels": [p[0] for p in panels], "legend": legend}


# ----------------------------------------------------------------------------- bar chart

def bar_chart(names: Sequence[str], values: Sequence[float], title: str, out_path,
              xlabel: str = "", counted: Optional[Sequence[bool]] = None) -> dict:
    """Horizontal bars, one per class in the given order (top to bottom); NaN as a grey 'n/a'.

    ``counted`` (per class, optional): False marks a class the quoted mean leaves out (for the
    mIoU, a class without GT pixels): its bar is drawn in another colour and its name gets
    ``" (not in GT)"``. The figure is 800 px wide and grows by 22 px per class, so 171 classes
    stay readable. Returns ``{"size": (W, H), "missing": [names with NaN], "labels": [the
    names as drawn]}``.
    """
    from matplotlib.figure import Figure

    names = [str(n) for n in names]
    vals = np.asarray([float(v) if _finite(v) else math.nan for v in values], dtype=np.float64)
    if len(names) != len(vals):
        raise ValueError(f"{len(names)} names but {len(vals)} values")
    absent = np.zeros(len(names), dtype=bool) if counted is None else ~np.asarray(counted, dtype=bool)
    if absent.shape != (len(names),):
        raise ValueError(f"{len(names)} names but {absent.size} 'counted' flags")
    labels = [nm + ABSENT_SUFFIX if a else nm for nm, a in zip(names, absent)]
    n = len(names)
    width_px = round(BAR_WIDTH_IN * DPI)
    height_px = round((BAR_EXTRA_IN + BAR_ROW_IN * max(n, 3)) * DPI)
    # matplotlib truncates the canvas to whole pixels (3.11.1 and later round within 1e-8 px), and
    # height_px / DPI * DPI can land just below height_px: a hundredth of a pixel more is asked for.
    fig = Figure(figsize=((width_px + 0.01) / DPI, (height_px + 0.01) / DPI), dpi=DPI,
                 facecolor="white", layout="constrained")
    ax = fig.add_subplot()
    missing = np.isnan(vals)
    shown = np.where(missing, 0.0, vals)
    y = np.arange(n)
    top = max(1.0, float(np.nanmax(vals)) if (~missing).any() else 1.0)
    colours = np.where(missing, MISSING_COLOUR, np.where(absent, ABSENT_COLOUR, "#3b75af"))
    ax.barh(y, shown, height=0.7, color=colours.tolist())
    for i in range(n):
        if missing[i]:
            ax.text(0.005 * top, i, "n/a", va="center", ha="left", fontsize=7, color="#707070")
        else:
            ax.text(shown[i] + 0.005 * top, i, f"{shown[i]:.3f}", va="center", ha="left", fontsize=7)
    ax.set_yticks(y, labels, fontsize=8 if n <= 40 else 7)
    for tick, miss in zip(ax.get_yticklabels(), missing):
        if miss:
            tick.set_color("#909090")
    ax.set_ylim(n - 0.5, -0.5)  # first class on top
    ax.set_xlim(0, top * 1.1)
    ax.set_title(title, fontsize=11)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    if n > 40:  # a tall chart: the scale on top as well
        ax.tick_params(axis="x", labeltop=True, top=True)
    ax.set_axisbelow(True)
    _save_figure(fig, out_path)
    return {"size": (width_px, height_px), "missing": [nm for nm, m in zip(names, missing) if m], "labels": labels}


__all__ = ["draw_tags", "cam_overlays", "mask_comparison", "mask_overlay", "legend_entries", "bar_chart", "heatmap_rgb",
           "load_rgb", "safe_name"]
