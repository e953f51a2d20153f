"""The web studio (``bitdance serve``): HTTP API, validation, queue, CLI errors, and the page in a real
headless browser (Debian's chromium driven by playwright)."""

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline
from PIL import Image

from bitdance.apps.cli import main
from bitdance.apps.studio import make_server
from bitdance.apps.studio_jobs import Studio, StudioError, model_names

pytestmark = pytest.mark.usefixtures("one_thread")

INSTALL_HINT = ("the browser test needs Debian's chromium and the playwright Python package: "
                "'apt-get install -y chromium && pip install playwright' (or run 'bash scripts/setup.sh'); "
                "do not run 'playwright install', the system browser is used")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def pipe1x():
    """A second model with another P (1 token per AR step) and another class count."""
    return tiny_pipeline("BitDance-T-1x", seed=1, num_classes=6)


_TOKENS: dict[str, str] = {}  # server URL -> its API token (the page gets it as a cookie; scripts send it)


def _start(pipe, **kw):
    server = make_server(pipe, "127.0.0.1", 0, **kw)
    _TOKENS[server.url] = server.token
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _auth(url: str) -> dict[str, str]:
    base = "/".join(url.split("/")[:3])
    return {"Authorization": f"Bearer {_TOKENS[base]}"} if base in _TOKENS else {}


@pytest.fixture(scope="module")
def server(pipe):
    s = _start(pipe, preview_interval=0)  # every step: a tiny model is done in a fraction of a second
    yield s
    s.shutdown()
    s.server_close()


def _get(url):
    with urllib.request.urlopen(urllib.request.Request(url, headers=_auth(url)), timeout=30) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def _post(base, payload, raw=None):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(base + "/api/generate", data=data,
                                 headers={"Content-Type": "application/json", **_auth(base)})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _wait_done(base, job_id, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = json.loads(_get(f"{base}/api/jobs/{job_id}")[2])
        if s["status"] in ("done", "error"):
            return s
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def test_page_and_info(server):
    status, ctype, body = _get(server.url + "/")
    assert status == 200 and ctype.startswith("text/html") and b"BitDance studio" in body
    assert b"http://" not in body and b"https://" not in body  # no CDN: works offline
    info = json.loads(_get(server.url + "/api/info")[2])
    assert info["kind"] == "class_conditional" and info["num_classes"] == 10 and info["image_size"] == 32
    assert info["limits"]["steps"] == [1, 200] and info["limits"]["num_images"] == [1, 16]


@pytest.mark.parametrize("payload, status, words", [
    ({"classes": [1], "steps": 0}, 400, "steps must be between 1 and 200, got 0"),
    ({"classes": [1], "steps": 201}, 400, "steps must be between 1 and 200"),
    ({"classes": [1], "steps": "many"}, 400, "steps must be an integer"),
    ({"classes": [10]}, 400, "class id 10 is out of range: this model has 10 classes (ids 0 to 9)"),
    ({"classes": [-1]}, 400, "class id -1 is out of range"),
    ({"classes": []}, 400, "choose at least one class"),
    ({"classes": [1], "guidance": 25}, 400, "guidance must be between 1 and 20"),
    ({"classes": [1], "guidance": 0.5}, 400, "guidance must be between 1 and 20"),
    ({"classes": [1], "num_images": 17}, 400, "number of images must be between 1 and 16"),
    ({"classes": [1, 2, 3], "num_images": 2}, 400, "smaller than the number of chosen classes"),
    ({"classes": [1], "schedule": "cosine"}, 400, "schedule must be 'linear' or 'constant'"),
    ({"prompt": "a cat"}, 400, "this model is class-conditional"),
    ([1, 2], 400, "must be a JSON object"),
])
def test_validation_errors_are_clear(server, payload, status, words):
    code, body = _post(server.url, payload)
    assert code == status and words in body["error"], body


def test_bad_json_and_unknown_job(server):
    code, body = _post(server.url, None, raw=b"{not json")
    assert code == 400 and "not valid JSON" in body["error"]
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(server.url + "/api/jobs/nope")
    assert e.value.code == 404


def test_result_matches_the_pipeline(server, pipe):
    """Previews decode partial grids on the side: the final images equal a direct pipeline call."""
    code, body = _post(server.url, {"classes": [3, 7], "num_images": 3, "seed": 5, "steps": 4, "guidance": 2})
    assert code == 202
    s = _wait_done(server.url, body["id"])
    assert s["status"] == "done" and len(s["images"]) == 3 and s["step"] == s["num_steps"] == 16
    want = pipe([3, 7, 3], num_inference_steps=4, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(5), output_type="np").images
    import io

    got = np.stack([np.asarray(Image.open(io.BytesIO(_get(server.url + u)[2]))) for u in s["images"]])
    assert np.array_equal(got, want)
    _, ctype, grid = _get(server.url + s["grid_url"])
    assert ctype == "image/png" and Image.open(io.BytesIO(grid)).size == (3 * 32, 32)
    assert body["id"] in [h["id"] for h in json.loads(_get(server.url + "/api/history")[2])]


def test_queue_serialises_requests_in_order(pipe):
    """Two concurrent requests: the second waits (position 1) and starts only after the first ended."""
    server = _start(pipe, start=False, preview_interval=0)
    try:
        results = {}

        def submit(name, cls):
            results[name] = _post(server.url, {"classes": [cls], "steps": 3, "seed": 1})

        t = threading.Thread(target=submit, args=("a", 1))
        t.start()
        t.join()
        submit("b", 2)  # a is still queued (the worker is stopped): b has one request ahead
        (ca, a), (cb, b) = results["a"], results["b"]
        assert ca == cb == 202 and a["position"] == 0 and b["position"] == 1
        assert json.loads(_get(f"{server.url}/api/jobs/{b['id']}")[2])["position"] == 1
        # Both requests really concurrent too (HTTP threads), while the worker runs.
        server.studio.start()
        extra = [None, None]
        ts = [threading.Thread(target=lambda i=i: extra.__setitem__(i, _post(server.url, {"classes": [i], "steps": 2})))
              for i in range(2)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        ids = [a["id"], b["id"]] + [e[1]["id"] for e in extra]
        states = [_wait_done(server.url, i) for i in ids]
        assert all(s["status"] == "done" for s in states)
        jobs = [server.studio.job(i) for i in ids]
        assert jobs[0].finished <= jobs[1].started  # one at a time, first come first served
        assert jobs[1].finished <= min(jobs[2].started, jobs[3].started)
        assert max(j.started for j in jobs[2:]) >= min(j.finished for j in jobs[2:])
    finally:
        server.shutdown()
        server.server_close()


def test_queue_full_and_studio_api(pipe):
    studio = Studio(pipe, start=False, max_queue=1)
    try:
        job = studio.submit({"classes": [1], "steps": 1})
        with pytest.raises(StudioError) as e:
            studio.submit({"classes": [1], "steps": 1})
        assert e.value.status == 503 and "queue is full" in str(e.value)
        studio.start()
        assert studio.wait(job, timeout=60) and job.status == "done" and len(job.images) == 1
    finally:
        studio.close()
    with pytest.raises(StudioError, match="class_names must list 10 names"):
        Studio(pipe, class_names=["a"], start=False)


def test_cli_serve_errors_are_one_line(pipe, tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitdance serve: error:") and "missing" in err and "\n" not in err
    pipe.save_pretrained(tmp_path / "m")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path / "m"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"port {port} on 127.0.0.1 is in use" in err and "\n" not in err


def test_cli_serve_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "127.0.0.1" in out and "7860" in out and "--model" in out


class FakeT2I:
    """The text-to-image pipeline contract (kind, config.check_resolution, __call__(prompt, height=, ...),
    decode), backed by the tiny class-conditional model: the studio's T2I path without an LLM."""

    kind = "text_to_image"
    default_resolution = (32, 32)

    def __init__(self, inner):
        from bitdance.models.config import T2IConfig

        self.inner, self.device, self.calls = inner, inner.device, []
        self.config = T2IConfig(parallel_num=4, latent_dim=4, down_factor=4, resolutions=((32, 32), (32, 64)))

    def __call__(self, prompt, *, height, width, num_inference_steps, guidance_scale, generator, output_type,
                 callback):
        self.calls.append((prompt, height, width))
        n = 1 if isinstance(prompt, str) else len(prompt)
        return self.inner([0] * n, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          generator=generator, output_type=output_type, callback=callback)

    def decode(self, latents):
        return self.inner.decode(latents)


def test_text_to_image_requests(pipe):
    t2i = FakeT2I(pipe)
    server = _start(t2i, preview_interval=0)
    try:
        info = json.loads(_get(server.url + "/api/info")[2])
        assert info["kind"] == "text_to_image" and info["resolutions"] == [[32, 32], [32, 64]]
        assert info["defaults"]["height"] == info["defaults"]["width"] == 32
        for payload, words in [({"prompt": "x" * 501}, "the prompt has 501 characters; at most 500"),
                               ({"prompt": "   "}, "type a prompt"),
                               ({"prompt": "a cat", "height": 40, "width": 40}, "resolution 40x40 (HxW) is not allowed"),
                               ({"classes": [1]}, "this model is text-to-image"),
                               ({"prompt": "a cat", "num_images": 0}, "number of images must be between 1 and 16")]:
            code, body = _post(server.url, payload)
            assert code == 400 and words in body["error"], body
        code, body = _post(server.url, {"prompt": " a red fox ", "num_images": 2, "steps": 2, "guidance": 3})
        assert code == 202
        s = _wait_done(server.url, body["id"])
        assert s["status"] == "done" and len(s["images"]) == 2 and s["params"]["prompt"] == "a red fox"
        assert t2i.calls == [(["a red fox"] * 2, 32, 32)]
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------
# several models (P = 4x and 1x) behind one studio
# --------------------------------------------------------------------------------------------
def _pngs(base, urls):
    import io

    return np.stack([np.asarray(Image.open(io.BytesIO(_get(base + u)[2]))) for u in urls])


def test_several_models_share_one_queue(pipe, pipe1x):
    server = _start({"t4x": pipe, "t1x": pipe1x}, start=False, preview_interval=0)
    try:
        info = json.loads(_get(server.url + "/api/info")[2])
        assert info["default_model"] == "t4x" and info["kind"] == "class_conditional"
        assert [(m["name"], m["parallel_num"], m["ar_steps"], m["num_classes"], m["resolution"])
                for m in info["models"]] == [("t4x", 4, 16, 10, "32x32"), ("t1x", 1, 64, 6, "32x32")]
        # Each model validates its own bounds; an unknown name is refused with the list of served ones.
        for payload, words in [({"model": "t9x", "classes": [1]}, "unknown model 't9x'; this studio serves: t4x, t1x"),
                               ({"model": 4, "classes": [1]}, "unknown model 4"),
                               ({"model": "t1x", "classes": [7]}, "this model has 6 classes")]:
            code, body = _post(server.url, payload)
            assert code == 400 and words in body["error"], body
        assert body["field"] == "classes" and _post(server.url, {"model": "x", "classes": [1]})[1]["field"] == "model"
        # The worker is stopped: jobs of both models wait in the one queue, in order.
        ca, a = _post(server.url, {"classes": [3, 7], "num_images": 2, "seed": 5, "steps": 3, "guidance": 2})
        cb, b = _post(server.url, {"model": "t1x", "classes": [5], "seed": 5, "steps": 3, "guidance": 2})
        assert ca == cb == 202 and (a["position"], b["position"]) == (0, 1)
        server.studio.start()
        sa, sb = _wait_done(server.url, a["id"]), _wait_done(server.url, b["id"])
        assert sa["status"] == sb["status"] == "done" and (sa["num_steps"], sb["num_steps"]) == (16, 64)
        ja, jb = server.studio.job(a["id"]), server.studio.job(b["id"])
        assert ja.finished <= jb.started
        for s, p, labels in [(sa, pipe, [3, 7]), (sb, pipe1x, [5])]:
            want = p(labels, num_inference_steps=3, guidance_scale=2.0,
                     generator=torch.Generator().manual_seed(5), output_type="np").images
            assert np.array_equal(_pngs(server.url, s["images"]), want)
        hist = json.loads(_get(server.url + "/api/history")[2])
        assert [(h["params"]["model"], h["params"]["parallel_num"]) for h in hist] == [("t1x", 1), ("t4x", 4)]
    finally:
        server.shutdown()
        server.server_close()


def test_studio_model_arguments(pipe, pipe1x):
    st = Studio([pipe, pipe1x], start=False, class_names={"model-2": list("abcdef")})
    assert list(st.models) == ["model-1", "model-2"] and st.pipe is pipe
    assert st.models["model-1"].class_names is None and st.models["model-2"].class_names == list("abcdef")
    assert Studio(pipe, start=False).info()["models"][0]["name"] == "model"
    with pytest.raises(StudioError, match="at least one model"):
        Studio({}, start=False)
    with pytest.raises(StudioError, match="unknown model"):
        Studio({"a": pipe}, class_names={"b": ["x"]}, start=False)
    with pytest.raises(StudioError, match="class_names must list 6 names"):
        Studio({"a": pipe, "b": pipe1x}, class_names=[str(i) for i in range(10)], start=False)


def test_model_names(tmp_path):
    (tmp_path / "r1/model").mkdir(parents=True)
    (tmp_path / "r2/model").mkdir(parents=True)
    (tmp_path / "BitDance_B_16x.pt").write_bytes(b"")
    paths = [tmp_path / "r1/model", tmp_path / "r2/model", tmp_path / "BitDance_B_16x.pt", tmp_path / "r1/model"]
    assert model_names(paths) == ["r1/model", "r2/model", "BitDance_B_16x", "r1/model-2"]


def test_cli_serve_several_models_errors(pipe, pipe1x, tmp_path, capsys):
    pipe.save_pretrained(tmp_path / "a")
    pipe1x.save_pretrained(tmp_path / "b")
    (tmp_path / "broken").mkdir()
    args = ["serve", "--port", "0", "--model", str(tmp_path / "a")]
    # A missing path is reported before anything is loaded; a broken one when its turn comes.
    for extra, words in [(["--model", str(tmp_path / "missing")], f"{tmp_path / 'missing'}: no such file"),
                         (["--model", str(tmp_path / "b"), "--model", str(tmp_path / "broken")], str(tmp_path / "broken")),
                         (["--model", str(tmp_path / "b")] + ["--tokenizer", "t.pt"] * 3, "--tokenizer given 3 times for 2"),
                         (["--model", str(tmp_path / "b"), "--tokenizer", "t.pt"], "every --model is a folder")]:
        assert main(args + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("bitdance serve: error:") and words in err and "\n" not in err, err


# --------------------------------------------------------------------------------------------
# the page in a real browser
# --------------------------------------------------------------------------------------------
def _chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(f"playwright is not installed. {INSTALL_HINT}")
    path = os.environ.get("BITDANCE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail(f"no chromium at {path}. {INSTALL_HINT}")
    return path


def test_browser_generation_streams_progress(pipe, pipe1x):
    # Enough flow steps that the 16 AR steps take a visible time, so the page receives several previews.
    server = _start(pipe, preview_interval=0)
    with _browser_page(server) as (page, errors):
        page.goto(server.url + "/")
        page.click("#classes button[data-cls='3']")
        assert not page.is_visible("#modelsel")  # one model: no selector
        page.click("#classes button[data-cls='5']")
        page.fill("#num", "2")
        page.fill("#steps", "40")
        page.fill("#seed", "11")
        page.click("#go")
        page.wait_for_selector("#history .item img", timeout=60_000)
        steps = page.evaluate("window.studio.progressSteps")
        n_previews = page.evaluate("window.studio.previewCount")
        assert len(set(steps)) >= 2 and n_previews >= 2, (steps, n_previews)
        assert steps == sorted(steps) and max(steps) < 16
        assert page.inner_text("#status").startswith("Done")
        src = page.get_attribute("#preview", "src")
        assert src.endswith("/grid.png")
        assert page.evaluate("document.getElementById('preview').naturalWidth") == 64
        # The history entry: image, description and a download link to a PNG.
        items = page.query_selector_all("#history .item")
        assert len(items) == 1 and "class 3, 5" in items[0].inner_text()
        href = items[0].query_selector("a.download").get_attribute("href")
        assert items[0].query_selector("a.download").get_attribute("download")
        _, ctype, data = _get(server.url + href)
        assert ctype == "image/png" and data[:8] == b"\x89PNG\r\n\x1a\n"
        # A server-side validation error is shown on the page.
        page.fill("#steps", "500")
        page.click("#go")
        page.wait_for_selector("#error:not(:empty)")  # (wait_for_function would need eval: CSP)
        assert "steps must be between 1 and 200" in page.inner_text("#error")
        assert not errors, errors
        # A text-to-image model gets a prompt box and a resolution list instead of classes.
        t2i = _start(FakeT2I(pipe), preview_interval=0)
        try:
            page.goto(t2i.url + "/")
            page.wait_for_selector("#resolution option", state="attached")
            assert page.is_visible("#prompt") and not page.is_visible("#classes")
            page.fill("#prompt", "a red fox")
            page.click("#go")
            page.wait_for_selector("#history .item img", timeout=60_000)
            assert "a red fox" in page.inner_text("#history .item")
        finally:
            t2i.shutdown()
            t2i.server_close()
        # Several models: a selector; switching swaps the class picker (10 -> 6 classes).
        multi = _start({"t4x": pipe, "t1x": pipe1x, "fake-t2i": FakeT2I(pipe)}, preview_interval=0)
        try:
            page.goto(multi.url + "/")
            page.wait_for_selector("#classes button", state="attached")
            options = page.inner_text("#modelsel").splitlines()
            assert len(options) == 3 and "P 4x" in options[0] and "t1x" in options[1] and "P 1x" in options[1]
            assert "64 AR steps" in options[1] and "text-to-image" in options[2]
            assert len(page.query_selector_all("#classes button")) == 10
            page.select_option("#modelsel", "fake-t2i")
            assert page.is_visible("#prompt") and not page.is_visible("#classes")
            page.select_option("#modelsel", "t1x")
            assert len(page.query_selector_all("#classes button")) == 6 and not page.is_visible("#prompt")
            assert page.inner_text("#model").startswith("t1x:")
            page.click("#classes button[data-cls='5']")
            page.fill("#num", "1")
            page.fill("#steps", "2")
            page.click("#go")
            page.wait_for_selector("#history .item img", timeout=60_000)
            text = page.inner_text("#history .item")
            assert "t1x (P 1x)" in text and "class 5" in text, text
            job = multi.studio.job(page.get_attribute("#history .item", "data-job"))
            assert job.params["model"] == "t1x" and len(job.images) == 1
        finally:
            multi.shutdown()
            multi.server_close()
        assert not errors, errors


# --------------------------------------------------------------------------------------------
# editing: an upload or a result, and a painted mask
# --------------------------------------------------------------------------------------------
def _data_url(array) -> str:
    import base64
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_edit_over_http_is_the_pipeline_edit(server, pipe):
    import io

    code, body = _post(server.url, {"classes": [3], "num_images": 1, "seed": 5, "steps": 2})
    first = _wait_done(server.url, body["id"])
    image = np.asarray(Image.open(io.BytesIO(_get(server.url + first["images"][0])[2])))
    mask = np.zeros((32, 32), np.uint8)
    mask[16:] = 255
    code, body = _post(server.url, {"classes": [8], "num_images": 2, "seed": 6, "steps": 2, "guidance": 2,
                                    "edit": {"source": {"job": first["id"], "index": 0}, "mask": _data_url(mask)}})
    assert code == 202, body
    s = _wait_done(server.url, body["id"])
    assert s["status"] == "done" and s["params"]["edit"] == {"source": f"result {first['id']}#0", "masked": 0.5}
    got = np.stack([np.asarray(Image.open(io.BytesIO(_get(server.url + u)[2]))) for u in s["images"]])
    want = pipe.edit(image, mask > 0, class_labels=[8, 8], num_inference_steps=2, guidance_scale=2.0,
                     generator=torch.Generator().manual_seed(6), output_type="np").images
    assert np.array_equal(got, want)
    # an upload (a data URL) works the same way
    code, body = _post(server.url, {"classes": [1], "steps": 2, "edit": {"source": _data_url(image),
                                                                         "mask": _data_url(mask)}})
    assert code == 202 and _wait_done(server.url, body["id"])["params"]["edit"]["source"] == "upload"


@pytest.mark.parametrize("edit, words", [
    ({"source": {"job": "nope", "index": 0}, "mask": "MASK"}, "no finished result"),
    ({"source": "IMAGE", "mask": "SMALL"}, "the mask is 16x16 but the image is 32x32"),
    ({"source": "IMAGE", "mask": "EMPTY"}, "the mask is empty"),
    ({"source": "IMAGE", "mask": "FULL"}, "covers the whole image"),
    ({"source": "IMAGE"}, "mask is missing"),
    ({"source": "data:image/png;base64,AAAA", "mask": "MASK"}, "not a readable image"),
    ({"source": "http://example.com/x.png", "mask": "MASK"}, "data:image"),
    ({"source": "HUGE", "mask": "MASK"}, "at most 2048 px"),
    ("IMAGE", "edit must be"),
])
def test_edit_errors_are_clear(server, edit, words):
    image = np.zeros((32, 32, 3), np.uint8)
    half = np.zeros((32, 32), np.uint8)
    half[16:] = 255
    urls = {"IMAGE": _data_url(image), "MASK": _data_url(half), "SMALL": _data_url(half[:16, :16]),
            "EMPTY": _data_url(np.zeros((32, 32), np.uint8)), "FULL": _data_url(np.full((32, 32), 255, np.uint8)),
            "HUGE": _data_url(np.zeros((1, 3000), np.uint8))}
    edit = urls.get(edit, edit) if isinstance(edit, str) else {k: urls.get(v, v) if isinstance(v, str) else v
                                                                for k, v in edit.items()}
    code, body = _post(server.url, {"classes": [1], "steps": 2, "edit": edit})
    assert code == 400 and words in body["error"] and body.get("field") == "edit", body


@contextlib.contextmanager
def _browser_page(server):
    """A headless chromium page (and the list of its script errors) for ``server``, shut down after."""
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, headless=True)
            try:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                yield page, errors
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()


def test_browser_edit_paints_and_regenerates(pipe, tmp_path):
    upload = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(upload)
    server = _start(pipe, preview_interval=0)
    with _browser_page(server) as (page, errors):
        page.goto(server.url + "/")
        page.click("#classes button[data-cls='2']")
        page.fill("#num", "1")
        page.fill("#steps", "2")
        page.click("#go")
        page.wait_for_selector("#history .item img", timeout=60_000)
        # Edit the result: paint the lower half, regenerate it as another class.
        page.click("#history .item a.edit")
        page.wait_for_selector("#maskview", state="visible")
        assert page.inner_text("#go").startswith("Regenerate")
        box = page.query_selector("#maskview").bounding_box()
        page.mouse.move(box["x"] + 2, box["y"] + box["height"] * 0.75)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] * 0.75, steps=8)
        page.mouse.up()
        page.click("#classes button[data-cls='2']")
        page.click("#classes button[data-cls='6']")
        page.fill("#steps", "20")
        page.click("#go")
        page.wait_for_selector("#history .item:nth-child(2) img", timeout=60_000)
        newest = page.query_selector("#history .item")
        assert "edit of result" in newest.inner_text() and "class 6" in newest.inner_text()
        job = server.studio.job(newest.get_attribute("data-job"))
        assert job.params["edit"]["source"].startswith("result ") and 0 < job.params["edit"]["masked"] < 1
        assert page.evaluate("window.studio.progressSteps").count(1) >= 1  # it streamed progress
        # An upload: cropped and scaled to the model's 32x32 in the page, then painted.
        page.set_input_files("#upload", str(upload))
        page.wait_for_selector("#maskview", state="visible")
        assert page.evaluate("document.getElementById('editimg').width") == 32
        box = page.query_selector("#maskview").bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.click("#go")
        page.wait_for_selector("#history .item:nth-child(3) img", timeout=60_000)
        assert "edit of upload" in page.inner_text("#history .item")
        # An empty mask is refused with the server's message.
        page.click("#clearmask")
        page.click("#go")
        page.wait_for_selector("#error:not(:empty)")
        assert "mask is empty" in page.inner_text("#error")
        page.click("#stopedit")
        assert page.inner_text("#go") == "Generate" and not page.is_visible("#maskview")
        assert not errors, errors


def test_text_to_image_edit_over_http():
    pytest.importorskip("transformers")
    import io

    from test_t2i import tiny_model  # tests/ is on sys.path under pytest

    from bitdance.pipelines.text_to_image import BitDanceT2IPipeline

    t2i = BitDanceT2IPipeline(tiny_model())
    server = _start(t2i, preview_interval=0)
    try:
        image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        mask[32:] = 255
        code, body = _post(server.url, {"prompt": "a red heart", "steps": 2, "guidance": 2, "seed": 4,
                                        "edit": {"source": _data_url(image), "mask": _data_url(mask)}})
        assert code == 202, body
        s = _wait_done(server.url, body["id"])
        assert s["status"] == "done" and (s["params"]["height"], s["params"]["width"]) == (64, 64)
        got = np.asarray(Image.open(io.BytesIO(_get(server.url + s["images"][0])[2])))
        want = t2i.edit(image, mask > 0, prompt="a red heart", num_inference_steps=2, guidance_scale=2.0,
                        generator=torch.Generator().manual_seed(4), output_type="np").images[0]
        assert np.array_equal(got, want)
        # the image's size must be an allowed resolution of the model
        code, body = _post(server.url, {"prompt": "x", "steps": 2, "edit": {
            "source": _data_url(image[:48]), "mask": _data_url(mask[:48])}})
        assert code == 400 and "not allowed" in body["error"], body
    finally:
        server.shutdown()
        server.server_close()
