"""`capcli demo`: the page's functions against Captioner, its errors, the model facts it shows, the
command's own errors, and the page itself driven in a real browser (marked `browser`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capcli import demo
from capcli.api import Captioner
from tests.conftest import REPO, invoke

SCENE = REPO / "examples" / "images" / "scene_0.png"


@pytest.fixture(scope="module")
def captioner(tiny_run) -> Captioner:
    return Captioner.load(tiny_run, "cpu")


@pytest.fixture()
def not_an_image(tmp_path) -> Path:
    path = tmp_path / "notes.png"
    path.write_text("a shopping list, not a photo\n")
    return path


def test_page_captions_are_the_apis(captioner):
    result = demo.caption_photos(captioner, [str(SCENE), str(REPO / "examples/images/scene_1.png")], beam=3)
    expected = captioner.caption([str(SCENE), str(REPO / "examples/images/scene_1.png")], beam=3)
    assert [r["caption"] for r in result.rows] == expected
    assert [r["name"] for r in result.rows] == ["scene_0.png", "scene_1.png"]
    assert result.status.startswith("Captioned 2 photos in ") and "(beam 3)" in result.status
    # the same n-gram blocking and sampling as the API, seed included
    sampled = demo.caption_photos(captioner, [str(SCENE)], beam=3, block_ngrams=0, sample=True, temperature=0.7,
                                  top_k=5, seed=11)
    assert sampled.rows[0]["caption"] == captioner.caption(str(SCENE), block_ngrams=0,
                                                           sample={"temperature": 0.7, "top_k": 5}, seed=11)
    assert "sampled at temperature 0.7, top-5, seed 11" in sampled.status


def test_bad_uploads_get_a_sentence_not_a_traceback(captioner, not_an_image, tmp_path, monkeypatch):
    result = demo.caption_photos(captioner, [str(not_an_image)])
    assert result.photos == [] and result.rows[0]["caption"] is None
    assert result.status.startswith("**Nothing to caption.** notes.png is not an image (its name says .png")
    # one bad file among good ones: the good ones are captioned, the bad one is named
    mixed = demo.caption_photos(captioner, [str(SCENE), str(not_an_image)], beam=3)
    assert mixed.rows[0]["caption"] == captioner.caption(str(SCENE), beam=3)
    assert mixed.rows[1]["caption"] is None and "**Skipped:** notes.png is not an image" in mixed.status
    assert "Add one or more photos first" in demo.caption_photos(captioner, []).status
    assert "Add one or more photos first" in demo.caption_photos(captioner, None).status
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert demo.caption_photos(captioner, [str(empty)]).rows[0]["error"] == "empty.jpg is an empty file"
    truncated = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "whole.jpg")
    truncated.write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    assert "cut.jpg is a damaged or truncated image" in demo.caption_photos(captioner, [str(truncated)]).rows[0]["error"]
    monkeypatch.setattr(demo, "MAX_PIXELS", 1000)  # a huge photo, without making one
    big = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(big)
    assert demo.caption_photos(captioner, [str(big)]).rows[0]["error"] == (
        "big.png is too large (40 x 30 px, 0 MP); the demo takes photos up to 0 MP: downscale it first")
    monkeypatch.setattr(demo, "MAX_PHOTOS", 2)
    many = demo.caption_photos(captioner, [str(SCENE)] * 3)
    assert many.rows == [] and "3 photos is more than the demo captions at once (2)" in many.status


def test_same_names_are_told_apart(captioner, tmp_path):
    other = tmp_path / "scene_0.png"
    shutil.copy(REPO / "examples/images/scene_2.png", other)
    result = demo.caption_photos(captioner, [str(SCENE), str(other)])
    assert [name for name, _ in result.photos] == ["scene_0.png", "scene_0.png (2)"]


def test_attention_and_heat_maps(captioner):
    att = demo.attention_for(captioner, "scene_0.png", SCENE, beam=3)
    ref = captioner.caption_with_attention(str(SCENE), beam=3)
    assert att.words == ref["words"] and att.labels == [*ref["words"], "<end>"][: len(ref["attention"])]
    assert np.array_equal(att.alphas, ref["attention"])
    assert demo.word_heatmap(att, 0).size == (demo.HEATMAP_SIZE, demo.HEATMAP_SIZE)
    # the heat map is hot where the weight is: a 2x2 grid looking at its top-left region
    image = np.full((3, 8, 8), 128, np.uint8)
    focused = demo.Attention("x", ["w"], np.array([[[1.0, 0.0], [0.0, 0.0]]] * 2), image)
    heat = np.asarray(demo.word_heatmap(focused, 0, size=64)).astype(int)
    top_left, bottom_right = heat[4, 4], heat[60, 60]
    assert top_left[0] > bottom_right[0] + 100  # red-yellow against dark blue
    assert bottom_right[2] > bottom_right[0]


def test_page_events_turn_failures_into_messages(caplog):
    gr = pytest.importorskip("gradio")
    from capcli.errors import UserError

    def broken(x):
        raise ValueError(f"boom {x}")

    def refused(x):
        raise UserError("that model needs capcli 9")

    with pytest.raises(gr.Error) as failed:
        demo.guarded(gr, broken)(1)
    assert failed.value.message == "The request failed (ValueError: boom 1); the server's log has the details."
    assert "ValueError: boom 1" in caplog.text  # the traceback goes to the server's log
    with pytest.raises(gr.Error) as user:
        demo.guarded(gr, refused)(1)
    assert user.value.message == "that model needs capcli 9"
    assert demo.guarded(gr, lambda x: x + 1)(1) == 2


def test_rows_html_escapes():
    html = demo.rows_html([{"name": "<b>.png", "caption": "a <cat> & dog", "error": None},
                           {"name": "x.png", "caption": None, "error": "x.png is an empty file"}])
    assert '<td class="caption">a &lt;cat&gt; &amp; dog</td>' in html and "&lt;b&gt;.png" in html
    assert '<td class="error">x.png is an empty file</td>' in html


def test_model_facts_from_a_run_and_its_exported_folder(tiny_run, tiny_data, runner, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    scores = {"split": "test", "beam_size": 3, "images": 6, "bleu4": 0.1234, "cider": 0.5678, "meteor": 0.2,
              "rouge_l": 0.3, "predictions": "ignored"}
    (run / "eval-test").mkdir()
    (run / "eval-test" / "eval.json").write_text(json.dumps(scores))
    facts = Captioner.load(run, "cpu").describe()
    assert facts["encoder"] == {"name": "convnext_atto", "pretrained": False, "frozen": False, "grid": 1}
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    assert facts["image_size"] == 32 and facts["vocab_size"] == manifest["vocab"]["size"]
    assert facts["scores"] == [{k: v for k, v in scores.items() if k != "predictions"}]
    assert facts["training_data"]["splits"]["train"]["images"] == manifest["splits"]["train"]["images"]
    assert facts["parameters"]["total"] == facts["parameters"]["encoder"] + facts["parameters"]["decoder"] > 0
    page = demo.facts_markdown(facts)
    assert "| test | 3 | 6 | 12.3 | 20.0 | 30.0 | 0.568 |" in page and "`convnext_atto`" in page
    assert f"train {manifest['splits']['train']['images']} photos" in page
    # an exported folder carries the same facts, even where the data and the run are gone
    invoke(runner, ["export", run, tmp_path / "folder", "--quiet"])
    shutil.rmtree(run)
    folder_facts = Captioner.load(tmp_path / "folder", "cpu").describe()
    for key in ("scores", "training_data", "encoder", "image_size", "vocab_size", "parameters"):
        assert folder_facts[key] == facts[key], key
    card = (tmp_path / "folder" / "README.md").read_text()
    assert "| test | 3 | 6 | - | - | - | 12.34 | 20.00 | 30.00 | 0.568 |" in card
    no_scores = demo.facts_markdown({**facts, "scores": []})
    assert "No `capcli evaluate` scores were recorded" in no_scores


def test_without_gradio_one_line_names_the_extra(runner, tiny_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    result = invoke(runner, ["demo", tiny_run], code=1)
    assert 'capcli demo needs Gradio, which the core install leaves out: pip install "capcli[demo]"' in result.output
    assert "Traceback" not in result.output


def test_bad_examples_path(runner, tiny_run):
    pytest.importorskip("gradio")
    result = invoke(runner, ["demo", tiny_run, "--examples", "no/such/folder"], code=1)
    assert "--examples no/such/folder: no such file or folder" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_demo(model, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "capcli", "demo", str(model), "--port", str(port), "--device", "cpu",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_url(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The URL the demo says it listens on (its first line of output)."""
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            found = re.search(r"at (http://\S+)", line)
            assert found, line
            return found.group(1)
        if proc.poll() is not None:
            break
    raise AssertionError(f"demo did not start: rc {proc.poll()}, {line!r}, {proc.stderr.read() if proc.poll() is not None else ''}")


def test_port_in_use_is_one_line(tiny_run):
    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _start_demo(tiny_run, port)
        try:
            out, err = proc.communicate(timeout=180)
        finally:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pass --port N" in err and "Traceback" not in err


def _chromium() -> str | None:
    return os.environ.get("CAPCLI_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _skip(reason: str):
    """Skip where the browser stack is missing, unless CI said it must be there (.ci/run)."""
    if os.environ.get("CAPCLI_REQUIRE_BROWSER"):
        pytest.fail(f"CAPCLI_REQUIRE_BROWSER is set, but {reason}")
    pytest.skip(reason)


@pytest.mark.browser
def test_page_in_a_real_browser(tiny_run, captioner, not_an_image, tmp_path):
    try:
        import gradio  # noqa: F401
        from playwright import sync_api as playwright
    except ImportError as exc:
        _skip(f"the browser test needs Gradio and Playwright ({exc.name} is missing): pip install -e '.[test]'")
    browser_path = _chromium()
    if browser_path is None:
        _skip("no Chromium to drive: apt-get install chromium (or set CAPCLI_CHROMIUM to a Chromium binary)")
    expected = captioner.caption(str(SCENE), beam=3)
    proc = _start_demo(tiny_run, _free_port())
    try:
        url = _wait_for_url(proc)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#photos input[type=file]", state="attached")
            assert "convnext_atto" in page.inner_text("#model-facts")  # what the model is
            page.set_input_files("#photos input[type=file]", [str(SCENE)])
            page.wait_for_selector("#photos :text('scene_0.png')")
            beam = page.locator("#beam input[type=number]")
            beam.fill("3")
            beam.press("Enter")
            page.click("#caption-button")
            cell = page.locator("#caption-table td.caption")
            cell.wait_for(timeout=60_000)
            assert cell.inner_text() == expected  # exactly the API's caption
            assert "(beam 3)" in page.inner_text("#status")
            # a word clicked: its heat map is drawn under its name
            words = page.locator("#words label")
            assert words.count() == len(expected.split()) + 1  # the words, then <end>
            last = len(expected.split()) - 1
            words.nth(last).click()
            label = f"Attention for '{expected.split()[last]}' (scene_0.png)"
            page.locator(f"#heatmap :text(\"{label}\")").wait_for(timeout=30_000)
            heat = page.locator("#heatmap img")
            heat.wait_for(timeout=30_000)
            assert heat.get_attribute("src")
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            # a text file named .png: a message on the page, no traceback
            page.locator("#photos button[aria-label='Clear']").first.click()
            page.set_input_files("#photos input[type=file]", [str(not_an_image)])
            page.wait_for_selector("#photos :text('notes.png')")
            page.click("#caption-button")
            page.locator("#status :text('notes.png is not an image')").wait_for(timeout=30_000)
            text = page.inner_text("body")
            assert "Traceback" not in text and "Error" not in text.replace("error", "")
            browser.close()
        with Image.open(tmp_path / "demo.png") as shot:
            assert shot.size[0] == 1280 and shot.size[1] > 600
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the demo did not stop on Ctrl-C within 90 s:\n{out}\n{err[-3000:]}") from None
    assert proc.returncode == 0, err
    assert "capcli demo: stopped" in out and "Traceback" not in err
