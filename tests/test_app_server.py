"""``tagclip app`` as users meet it: the command starts a server, ``gradio_client`` calls its API,
and headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright) uses the page.

These tests need the ``[app]`` and ``[test]`` extras and Debian's ``chromium`` package
(``.ci/run`` installs them); without them they fail, naming what is missing.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import helpers
import numpy as np
import pytest
from gradio_client import Client, handle_file
from playwright.sync_api import expect, sync_playwright

from pipelines import app as A
from tagclip.tagger import Tagger

REPO = Path(__file__).resolve().parent.parent
TINY = helpers.TINY_CHECKPOINT
SAMPLES = REPO / "pipelines" / "samples"
CHROMIUM = Path("/usr/bin/chromium")
# As root in a closed network: no sandbox, and none of Chromium's calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
STARTUP_TIMEOUT_S = 180   # model load and Gradio's start on a busy 2-core machine
STOP_TIMEOUT_S = 60      # Ctrl+C to exit
RUN_TIMEOUT_MS = 120_000  # one request of the tiny model on the CPU, in the browser
SCORE_ATOL = 1e-6
CLASSES = "cat, dog, cup, sofa"
NAMES = ["cat", "dog", "cup", "sofa"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """``python -m pipelines app`` in a subprocess; its output lines arrive in a queue."""

    def __init__(self, tmp: Path, *extra: str):
        env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines", "app", "--model_path", str(TINY), "--device", "cpu", *extra],
            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str) -> str:
        while True:
            try:
                line = self.lines.get(timeout=STARTUP_TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"no line {prefix!r} within {STARTUP_TIMEOUT_S} s; output:\n"
                                     + "\n".join(self.seen)) from None
            if line is None:
                raise AssertionError(f"the app exited ({self.proc.wait()}) before {prefix!r}:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def stop(self) -> int:
        """Ctrl+C, and the exit status (a process that does not stop is killed, and the test fails)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free port of 127.0.0.1, its URL, and the process."""
    tmp = tmp_path_factory.mktemp("app")
    port = free_port()
    app = AppProcess(tmp, "--port", str(port))
    line = app.wait_for("tagclip app: ")
    url = f"http://127.0.0.1:{port}/"
    assert line.startswith(f"tagclip app: {url} "), line
    yield url, app
    assert app.stop() == 0, "\n".join(app.seen)


@pytest.fixture(scope="module")
def tagger():
    return Tagger(helpers.tiny_model(), NAMES, ["floor", "wall"])


def test_api_scores_equal_the_tagger(server, tagger):
    url, _ = server
    client = Client(url, verbose=False)
    files = [SAMPLES / "cat.jpg", SAMPLES / "coffee.jpg"]
    status, shown, archive, summary = client.predict(
        [handle_file(str(f)) for f in files], CLASSES, "floor, wall", "voc2007", False, api_name="/run")
    assert status.startswith("Tagged and segmented 2 image(s)")
    assert sorted(summary["images"]) == ["cat", "coffee"]
    for f in files:
        page = summary["images"][f.stem]
        expected = tagger.tag(f)
        assert list(page["scores"]) == NAMES
        np.testing.assert_allclose(list(page["scores"].values()), list(expected.values()), rtol=0, atol=SCORE_ATOL)
        assert page["tags"] == [NAMES[c] for c in sorted(tagger.labels(np.array([list(expected.values())])
                                                                        .astype(np.float32))[0],
                                                           key=lambda c: -expected[NAMES[c]])]
    assert shown.count('<section class="tc-image">') == 2 and 'alt="mask of coffee.jpg"' in shown
    assert shown.count('alt="CAM of ') == sum(len(summary["images"][f.stem]["tags"]) for f in files)
    assert Path(archive).name == A.RESULTS_ZIP and Path(archive).stat().st_size > 0


def test_api_refuses_an_empty_class_list(server):
    url, _ = server
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="no class names given"):
        client.predict([handle_file(str(SAMPLES / "cat.jpg"))], " , ", "", "voc2007", False, api_name="/run")
    with pytest.raises(Exception, match="'cat' is listed twice"):
        client.predict([handle_file(str(SAMPLES / "cat.jpg"))], "cat, dog, cat", "", "voc2007", False, api_name="/run")


def test_two_requests_at_once_both_finish_correctly(server, tagger):
    url, _ = server
    jobs = [(SAMPLES / "cat.jpg", "cat, dog, cup, sofa", "floor, wall"),
            (SAMPLES / "rocket.jpg", "rocket, sky, tree", "")]

    def call(job):
        image, classes, background = job
        client = Client(url, verbose=False)
        return client.predict([handle_file(str(image))], classes, background, "voc2007", False, api_name="/run")[3]

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(call, jobs)
    np.testing.assert_allclose(list(first["images"]["cat"]["scores"].values()),
                               list(tagger.tag(SAMPLES / "cat.jpg").values()), rtol=0, atol=SCORE_ATOL)
    assert list(second["images"]["rocket"]["scores"]) == ["rocket", "sky", "tree"]
    assert second["background"] == [] and first["background"] == ["floor", "wall"]


def test_the_page_in_a_real_browser(server, tmp_path):
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run installs it)"
    url, _ = server
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    shot = tmp_path / "app.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            upload = page.locator("#tc-files input[type=file]")
            upload.set_input_files([str(SAMPLES / "cat.jpg")])
            page.locator("#tc-classes textarea").fill(CLASSES)
            page.locator("#tc-background textarea, #tc-background input").first.fill("floor, wall")
            page.locator("#tc-run").click()
            rows = page.locator("#tc-results .tc-row")
            expect(rows.first).to_be_visible(timeout=RUN_TIMEOUT_MS)
            expect(page.locator("#tc-results .tc-mask img")).to_be_visible(timeout=RUN_TIMEOUT_MS)
            expect(page.locator("#tc-results .tc-cam img").first).to_be_visible(timeout=RUN_TIMEOUT_MS)
            download = page.locator("#tc-download a").first
            expect(download).to_be_visible(timeout=RUN_TIMEOUT_MS)
            expect(page.locator("#tc-status")).to_contain_text("Tagged and segmented 1 image(s)")
            # the page's tags are the library's
            expected = Tagger(helpers.tiny_model(), NAMES, ["floor", "wall"])
            scores = expected.tag(SAMPLES / "cat.jpg")
            tags = [NAMES[c] for c in expected.labels(np.array([list(scores.values())], dtype=np.float32))[0]]
            shown = page.locator("#tc-results .tc-tag .tc-name").all_inner_texts()
            assert sorted(shown) == sorted(tags)
            assert page.locator("#tc-results .tc-thr").count() == rows.count() == len(NAMES)
            assert page.locator("#tc-results .tc-cam figcaption").all_inner_texts() == sorted(
                tags, key=lambda t: -scores[t])
            # the previews are pictures the browser decoded (not broken images)
            assert page.locator("#tc-results .tc-mask img").evaluate("img => img.naturalWidth") > 0
            with page.expect_download() as got:
                download.click()
            saved = tmp_path / "results.zip"
            got.value.save_as(saved)
            with zipfile.ZipFile(saved) as archive:
                assert sorted(archive.namelist()) == ["cams/cat.npy", "masks/cat.png", "results.json"]
                assert json.loads(archive.read("results.json"))["images"]["cat"]["tags"][0] == max(scores,
                                                                                                 key=scores.get)
            page.screenshot(path=str(shot), full_page=True)

            # a corrupt file: a message in the page, the server keeps going
            page.locator("#tc-files button[aria-label='Clear']").first.click()
            upload.set_input_files([str(broken)])
            page.locator("#tc-run").click()
            status = page.locator("#tc-status")
            expect(status).to_contain_text("1 file(s) could not be read", timeout=RUN_TIMEOUT_MS)
            expect(status).to_contain_text("broken.jpg: ")

            # an empty class list: refused with a message
            upload.set_input_files([str(SAMPLES / "rocket.jpg")])
            page.locator("#tc-classes textarea").fill(" , ")
            page.locator("#tc-run").click()
            expect(page.get_by_text("no class names given").first).to_be_visible(timeout=RUN_TIMEOUT_MS)

            # a dataset vocabulary from the picker, and the page still works
            page.locator("#tc-vocabulary input").click()
            page.get_by_role("option", name="VOC 2007").click()
            voc_classes, voc_background, _ = A.vocabulary_words("VOC 2007")
            expect(page.locator("#tc-classes textarea")).to_have_value(voc_classes, timeout=10_000)
            expect(page.locator("#tc-background textarea, #tc-background input").first).to_have_value(voc_background)
            page.locator("#tc-run").click()
            expect(status).to_contain_text("Tagged and segmented 1 image(s)", timeout=RUN_TIMEOUT_MS)
            expect(page.locator("#tc-results .tc-title").first).to_contain_text("rocket.jpg")
        finally:
            browser.close()
    assert shot.stat().st_size > 0
    print(f"screenshot: {shot}")


def test_a_port_in_use_is_one_line_and_status_2_before_the_model_loads(server, monkeypatch, capsys):
    from pipelines.command import main

    url, _ = server
    port = url.rsplit(":", 1)[1].strip("/")
    monkeypatch.setattr(A, "load_model", lambda *a: pytest.fail("the model loaded before the port was checked"))
    assert main(["app", "--model_path", str(TINY), "--port", port]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: 127.0.0.1:{port}: cannot listen there (Address already in use); choose another --port or --host"]


def test_without_gradio_the_command_names_the_extra(monkeypatch, capsys):
    from pipelines.command import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["app", "--model_path", str(TINY)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: gradio: tagclip app needs Gradio, an optional extra: {A.APP_EXTRA}"]
