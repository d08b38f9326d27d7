"""Benchmark ``tagclip app``: start-up, seconds per image through the page's API, and the page's
overhead over the library.

    python benchmarks/bench_app.py [--model_path CKPT] [--n 4] [--device cpu]

Without ``--model_path``, a full-size random ViT-B/16 is written from a seed (no download).
Measures, on N synthetic 500×375 JPEGs and the four-word vocabulary below:

* start-up: from starting ``python -m pipelines app`` to its "tagclip app: URL" line (Python,
  torch and Gradio imports, model load, server start);
* one request of N images through ``gradio_client``, first with the vocabulary new to the
  server (its text features encoded), then again (cached): seconds per image;
* of that, the time inside the page's function (from its status line) and in Gradio and HTTP;
* the same images in-process with :class:`pipelines.segment.Segmenter` (scores, CAMs and the
  label map, no pictures, no zip, no HTTP): the page's ratio over the library;
* the server's peak memory (resident set, from ``/proc``).

Every figure is printed with the machine it was measured on.
"""
from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from random_clip import random_state_dict  # noqa: E402

from clip.loading import load_model  # noqa: E402
from clip.preprocess import load_model_input  # noqa: E402
from pipelines.segment import Segmenter  # noqa: E402
from toolkit.precision import device_facts  # noqa: E402

CLASSES = "cat, dog, person, sofa"
BACKGROUND = "floor, wall"
IMAGE_HW = (375, 500)      # a typical VOC image
STARTUP_TIMEOUT_S = 900


def write_images(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 255, (IMAGE_HW[0] // 25, IMAGE_HW[1] // 25, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize(IMAGE_HW[::-1], Image.BICUBIC)
        paths.append(folder / f"img{i}.jpg")
        picture.save(paths[-1], quality=90)
    return paths


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


def start_app(ckpt: str, device: str, port: int, env: dict) -> tuple[subprocess.Popen, float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "app", "--model_path", ckpt, "--device", device,
                             "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    while True:
        line = lines.get(timeout=STARTUP_TIMEOUT_S)
        if line.startswith("tagclip app: "):
            return proc, time.perf_counter() - start, line.split()[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None, help="checkpoint (default: a random full-size ViT-B/16)")
    p.add_argument("--n", type=int, default=4, help="images per request (default 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=7869)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from gradio_client import Client, handle_file

    device = torch.device(args.device)
    machine = f"{device_facts(device).describe()}, torch {torch.__version__}"
    print(f"machine: {machine}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_app_"))
    ckpt = args.model_path
    if ckpt is None:
        ckpt = str(work / "vit_b16_random.pt")
        torch.save(random_state_dict(args.seed), ckpt)
        print(f"model: random ViT-B/16 (seed {args.seed}), {ckpt}")
    images = write_images(work, args.n, args.seed)
    env = {**os.environ, "TAGCLIP_CACHE": str(work / "cache"), "GRADIO_TEMP_DIR": str(work / "gradio")}

    proc, startup, url = start_app(ckpt, args.device, args.port, env)
    try:
        client = Client(url, verbose=False)
        timings, inside = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            status = client.predict([handle_file(str(x)) for x in images], CLASSES, BACKGROUND, "voc2007", False,
                                    api_name="/run")[0]
            timings.append(time.perf_counter() - t0)
            inside.append(float(status.split(" in ", 1)[1].split(" s.", 1)[0]))  # "... image(s) in 9.1 s."
        server_peak = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    os.environ["TAGCLIP_CACHE"] = str(work / "cache")
    model = load_model(ckpt, args.device, "fp32", None, False, None)
    segmenter = Segmenter(model, [w.strip() for w in CLASSES.split(",")], [w.strip() for w in BACKGROUND.split(",")])
    t0 = time.perf_counter()
    for path in images:
        tensor, hw = load_model_input(path, patch_size=segmenter.tagger.patch_size)
        segmenter.segment(tensor, hw, segmenter.tagger.scores([tensor])[0])
    library = (time.perf_counter() - t0) / args.n

    cold, warm = timings[0] / args.n, timings[1] / args.n
    sys.stderr.flush()
    print()  # below the progress bars
    print(f"start-up (process start to URL): {startup:.1f} s   [{machine}]")
    print(f"per image, vocabulary new to the server: {cold:.2f} s; cached: {warm:.2f} s   [{machine}]")
    print(f"per image, library alone (Segmenter): {library:.2f} s; page / library: {warm / library:.2f}x   "
          f"[{machine}]")
    print(f"of the cached request's {timings[1]:.1f} s, {inside[1]:.1f} s inside the page's function (tags, CAMs, "
          f"pictures, zip), {timings[1] - inside[1]:.1f} s in Gradio and HTTP (uploads, previews, the zip's download)")
    print(f"server peak memory (RSS): {server_peak:.0f} MB")


if __name__ == "__main__":
    main()
