"""Bad input at every front door (issue 14): the command line, the Python API and the studio's HTTP API.

Each case asserts the one-line message (or HTTP status) and that nothing on disk changed.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline

from bitdance import BinaryTokenizer, BitDancePipeline, bitdance_preset
from bitdance.apps.cli import main
from bitdance.apps.studio import make_server
from bitdance.files import remove_stale_temps
from bitdance.formats.folders import save_tokenizer_folder
from bitdance.formats.weights import CheckpointError, load_file
from bitdance.validation import MAX_BATCH, InputError, seeded

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("doors") / "model"
    pipe.save_pretrained(root)
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))} if root.exists() else {}


def _fails(args, capsys, *words) -> str:
    """The command exits 2 with one line on stderr holding ``words``."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


# --------------------------------------------------------------------------------------------
# 1. Unbounded work from one argument
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, words", [
    (["--steps", "1000000000"], ["--steps must be between 1 and 1000, got 1000000000"]),
    (["--steps", "0"], ["--steps must be between 1 and 1000"]),
    (["--classes", *["1"] * (MAX_BATCH + 1)], [f"{MAX_BATCH + 1} images asked for; at most {MAX_BATCH}"]),
])
def test_cli_bounds_work_before_loading(folder, tmp_path, capsys, extra, words):
    before = _snapshot(tmp_path)
    _fails(["sample", str(folder), "--out", str(tmp_path / "keep.png"), *extra], capsys, *words)
    assert _snapshot(tmp_path) == before


def test_pipeline_bounds(pipe):
    with pytest.raises(InputError, match="num_inference_steps must be between 1 and 1000"):
        pipe([0], num_inference_steps=10**9)
    with pytest.raises(InputError, match=f"at most {MAX_BATCH}"):
        pipe([0] * (MAX_BATCH + 1), num_inference_steps=1)
    with pytest.raises(InputError, match="must hold integer class ids, got 1.5"):
        pipe([1.5], num_inference_steps=1)
    with pytest.raises(InputError, match="decode_chunk_size"):
        pipe([1], num_inference_steps=1, decode_chunk_size=0)
    with pytest.raises(ValueError, match="num_steps must be between 1 and 1000"):
        from bitdance.sampling.flow import FlowSampler

        FlowSampler(num_steps=10**9)


# --------------------------------------------------------------------------------------------
# 4. Silent wrong results
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, words", [("nan", "finite"), ("-3", "must be >= 1"), ("0.5", "must be >= 1"),
                                        ("inf", "finite"), ("1000", "between 1 and 100")])
def test_guidance_that_would_be_ignored_is_refused(folder, tmp_path, capsys, cfg, words):
    _fails(["sample", str(folder), "--cfg", cfg, "--out", str(tmp_path / "a.png")], capsys, "--cfg", words)
    assert not (tmp_path / "a.png").exists()


def test_pipeline_guidance_is_checked(pipe):
    for bad in (float("nan"), -3.0, 0.0, "4"):
        with pytest.raises(InputError, match="guidance_scale"):
            pipe([1], num_inference_steps=1, guidance_scale=bad)


def test_every_seed_has_its_own_images(pipe):
    def tokens(seed):
        return pipe([1, 2], num_inference_steps=2, generator=seeded(seed), output_type="latent").latents

    base = tokens(0)
    assert torch.equal(tokens(0), base)
    for seed in (2**32, 2**63 - 1):
        t = tokens(seed)
        assert not torch.equal(t, base), seed  # torch alone would keep only the low 32 bits: seed 0's images
        assert torch.equal(tokens(seed), t)  # and still one image per seed
    # Seeds below 2^32 keep torch's own seeding (the images earlier releases gave).
    assert torch.equal(torch.randn(5, generator=seeded(123)), torch.randn(5, generator=torch.Generator().manual_seed(123)))
    assert seeded(2**40).initial_seed() == 2**40


@pytest.mark.parametrize("seed", [str(2**63), str(2**64), "-1"])
def test_seeds_out_of_range_are_one_line_errors(folder, tmp_path, capsys, seed):
    _fails(["sample", str(folder), "--seed", seed, "--out", str(tmp_path / "a.png")], capsys,
           "--seed must be between 0 and 9223372036854775807")


def test_a_seed_of_5000_digits_is_a_short_usage_error(folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own usage error, as for any malformed option
        main(["sample", str(folder), "--seed", "1" * 5000, "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --seed: a number of 5000 digits is out of range" in err
    assert len(err) < 2000 and not (tmp_path / "a.png").exists()


def test_image_extension_is_honoured_or_refused(folder, tmp_path, capsys):
    assert main(["sample", str(folder), "--classes", "1", "--steps", "1", "--out", str(tmp_path / "c.jpg")]) == 0
    assert (tmp_path / "c.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes under a .jpg name
    _fails(["sample", str(folder), "--out", str(tmp_path / "c.gif")], capsys, "cannot write images as .gif")
    _fails(["sample", str(folder), "--out", str(tmp_path / "noext")], capsys, "without an extension")
    assert not (tmp_path / "c.gif").exists() and not (tmp_path / "noext").exists()


@pytest.mark.parametrize("flag", ["--height", "--width"])
def test_zero_image_size_is_refused(folder, tmp_path, capsys, flag):
    _fails(["sample", str(folder), flag, "0", "--out", str(tmp_path / "a.png")], capsys, f"{flag} must be between 1")


def test_pipeline_refuses_zero_height(pipe):
    with pytest.raises(InputError, match="height must be between 1"):
        pipe([1], num_inference_steps=1, height=0)


# --------------------------------------------------------------------------------------------
# 5. Tracebacks instead of one-line errors
# --------------------------------------------------------------------------------------------
def test_output_paths_are_checked_first(folder, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile.png").write_bytes(b"keep me")
    before = _snapshot(tmp_path)
    _fails(["sample", str(folder), "--out", str(tmp_path / "adir")], capsys, "is a folder", "--separate")
    _fails(["sample", str(folder), "--separate", "--out", str(tmp_path / "afile.png")], capsys,
           "is an existing file")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("device, words", [("bogus", "unknown device 'bogus'"), ("cuda:x", "unknown device"),
                                           ("meta", "not supported")])
def test_devices_are_one_line_errors(folder, tmp_path, capsys, device, words):
    _fails(["sample", str(folder), "--device", device, "--out", str(tmp_path / "a.png")], capsys, words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(folder, tmp_path, capsys):
    _fails(["sample", str(folder), "--device", "cuda", "--out", str(tmp_path / "a.png")], capsys,
           "CUDA is not available")
    _fails(["sample-npz", "--model", str(folder), "--device", "cuda", "--num-samples", "2",
            "--out", str(tmp_path / "a.npz")], capsys, "CUDA is not available")


def test_nrow_is_checked(folder, tmp_path, capsys):
    _fails(["sample", str(folder), "--nrow", "-1", "--out", str(tmp_path / "a.png")], capsys,
           "--nrow must be between 0 and")


def test_bench_bounds(capsys):
    _fails(["bench", "--preset", "BitDance-T-4x", "--image-size", "1000000"], capsys,
           "--image-size must be between 16 and 4096")
    _fails(["bench", "--preset", "BitDance-T-4x", "--steps", "0"], capsys, "--steps must be between 1 and 1000")


def test_sample_npz_bounds(folder, tmp_path, capsys):
    out = str(tmp_path / "s.npz")
    _fails(["sample-npz", "--model", str(folder), "--num-samples", "2", "--cfg", "nan", "--out", out], capsys, "--cfg")
    _fails(["sample-npz", "--model", str(folder), "--num-samples", "2", "--batch-size", "100000", "--out", out],
           capsys, "--batch-size must be between 1 and 256")
    _fails(["sample-npz", "--model", str(folder), "--num-samples", "2", "--seed", str(2**64), "--out", out], capsys,
           "--seed")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# 3. config.json checked as data, and against the weights' header, before anything is built
# --------------------------------------------------------------------------------------------
def _mutated(folder: Path, tmp_path: Path, change) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    cfg = json.loads((dst / "config.json").read_text())
    change(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name, change, words", [
    ("dim 1e9", lambda c: c["generator"].update(dim=10**9), ["dim = 1000000000 but the weights have dim = 128"]),
    ("classes", lambda c: c["generator"].update(num_classes=10**12), ["num_classes = 1000000000000", "= 10"]),
    ("image size", lambda c: c["generator"].update(image_size=10**6), ["image_size = 1000000", "= 32"]),
    ("tokenizer ch", lambda c: c["tokenizer"].update(ch=10**9), ["(tokenizer)", "ch = 1000000000", "ch = 32"]),
    ("negative", lambda c: c["generator"].update(dim=-64), ["dim must be a positive integer, got -64"]),
    ("string", lambda c: c["generator"].update(dim="64"), ["BitDanceConfig.dim must be an integer, got '64'"]),
    ("bool", lambda c: c["tokenizer"].update(gan_decoder="yes"), ["gan_decoder must be true or false"]),
    ("literal", lambda c: c["generator"].update(order="spiral"), ["order must be one of ['patch', 'raster']"]),
    ("4096", lambda c: c["generator"].update(dim=4096, n_head=32), ["dim = 4096 but the weights have dim = 128"]),
    ("layers", lambda c: c["generator"].update(n_layer=10**9), ["n_layer = 1000000000", "n_layer = 2"]),
    ("kind", lambda c: c.update(kind="evil"), ["unknown kind 'evil'"]),
])
def test_hostile_configs_are_refused_by_key(folder, tmp_path, capsys, name, change, words):
    bad = _mutated(folder, tmp_path, change)
    before = _snapshot(bad)
    _fails(["info", str(bad)], capsys, *words)
    assert _snapshot(bad) == before
    with pytest.raises(CheckpointError):
        BitDancePipeline.from_pretrained(bad)


def test_safe_loader_refusal_in_our_words(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo never",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    err = _fails(["info", str(tmp_path / "evil.pt")], capsys, "refusing to unpickle", "system")
    assert "weights_only" not in err and "will likely succeed" not in err
    with pytest.raises(CheckpointError, match="refusing to unpickle") as e:
        load_file(tmp_path / "evil.pt")
    assert "weights_only" not in str(e.value)


# --------------------------------------------------------------------------------------------
# 7. Temporary folders of interrupted writes
# --------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_stale_temps_are_removed_at_the_next_write(tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f".tokenizer.tmp-{dead}-abcd", tmp_path / f".tokenizer.old-{dead}"]
    for d in stale:
        d.mkdir()
        (d / "tokenizer.safetensors").write_bytes(b"half")
    legacy = tmp_path / ".tokenizer.k2j4h5g6"
    legacy.mkdir()
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    live = tmp_path / f".tokenizer.tmp-{os.getpid()}-zzzz"  # a write of this very process: kept
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}-abcd"  # another target's: left for its own next write
    other.mkdir()
    save_tokenizer_folder(BinaryTokenizer(bitdance_preset("BitDance-T-4x", tokenizer="tiny-d4c16").tokenizer),
                          tmp_path / "tokenizer")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["tokenizer", live.name, other.name]), left
    assert remove_stale_temps(tmp_path) == [other]


# --------------------------------------------------------------------------------------------
# 2 and 5. The studio: only its own pages drive it; every malformed request gets an answer
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def studio(pipe):
    lines: list[str] = []
    server = make_server(pipe, "127.0.0.1", 0, preview_interval=0, allow_hosts=["studio.lan"])
    server.log = lines.append
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.lines = lines
    yield server
    server.shutdown()
    server.server_close()


def _request(server, method, path, *, body=None, headers=None, host=None, token=True, timeout=120):
    port = server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    hdrs = {"Host": host if host is not None else f"127.0.0.1:{port}"}
    if token:
        hdrs["Authorization"] = f"Bearer {server.token}"
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
        hdrs["Content-Length"] = str(len(data))
    hdrs.update(headers or {})
    for k, v in hdrs.items():
        if v is not None:
            conn.putheader(k, v)
    conn.endheaders()
    if body is not None:
        conn.send(data)
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw
    return r.status, payload, r


def test_dns_rebinding_is_refused(studio):
    port = studio.server_address[1]
    evil = f"evil.example:{port}"
    code, body, _ = _request(studio, "POST", "/api/generate", body={"classes": [1]}, host=evil,
                             headers={"Origin": f"http://{evil}"})
    assert code == 403 and "not served here" in body["error"] and "--allow-host evil.example" in body["error"]
    code, body, _ = _request(studio, "GET", "/api/history", host=evil)
    assert code == 403
    assert _request(studio, "GET", "/", host=evil)[0] == 403
    # Names on the allow-list, localhost and IP addresses are served.
    for host in (f"studio.lan:{port}", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert _request(studio, "GET", "/api/info", host=host)[0] == 200, host


def test_cross_site_requests_are_refused(studio):
    port = studio.server_address[1]
    code, body, _ = _request(studio, "POST", "/api/generate", body=b'{"classes": [1]}',
                             headers={"Content-Type": "text/plain", "Origin": "null"})
    assert code == 403 and "cross-origin" in body["error"]
    code, body, _ = _request(studio, "POST", "/api/generate", body=b'{"classes": [1]}',
                             headers={"Content-Type": "text/plain"})
    assert code == 415 and "application/json" in body["error"]
    code, _, _ = _request(studio, "POST", "/api/generate", body={"classes": [1]}, headers={"Origin": "null"})
    assert code == 403
    code, _, _ = _request(studio, "POST", "/api/generate", body={"classes": [1]},
                          headers={"Origin": "http://other.example"})
    assert code == 403
    code, body, _ = _request(studio, "POST", "/api/generate", body={"classes": [1]}, token=False)
    assert code == 401 and "token" in body["error"]
    assert _request(studio, "GET", "/api/history", token=False)[0] == 401
    # The page sets a same-site cookie that authorises its own requests.
    code, page, r = _request(studio, "GET", "/", token=False)
    cookie = r.getheader("Set-Cookie")
    assert code == 200 and "SameSite=Strict" in cookie and "HttpOnly" in cookie
    code, body, _ = _request(studio, "POST", "/api/generate", body={"classes": [1], "steps": 1}, token=False,
                             headers={"Cookie": cookie.split(";")[0], "Origin": f"http://127.0.0.1:{port}"})
    assert code == 202, body
    assert studio.studio.wait(studio.studio.job(body["id"]), timeout=60)


@pytest.mark.parametrize("headers, body, status, words", [
    ({"Content-Length": "-5"}, b"", 400, "invalid Content-Length"),
    ({"Content-Length": "abc"}, b"", 400, "invalid Content-Length"),
    ({"Content-Length": None}, b"", 411, "Content-Length is required"),
    ({"Content-Length": "100"}, b'{"classes": [1]}', 400, "ended after 16 of 100 bytes"),
    ({}, ('{"classes": [1], "seed": ' + "9" * 5000 + "}").encode(), 400, "a number of more than 4300 digits"),
    ({}, b'{"classes": [1], "seed": ' + b"9" * 30 + b"}", 400, "seed must be between 0 and 9223372036854775807"),
    ({}, b'{"classes": [1.5]}', 400, "class id must be an integer"),
    ({}, b'{"classes": [1], "steps": "5"}', 400, "steps must be an integer between 1 and 200, got '5'"),
    ({}, b'{"classes": [1], "steps": 5.0}', 400, "steps must be an integer"),
    ({}, b'{"classes": [1], "steps": true}', 400, "steps must be an integer"),
    ({}, b'{"classes": [1], "guidance": "4"}', 400, "guidance must be a number"),
    ({}, b'{"classes": [1], "guidance": NaN}', 400, "guidance must be a finite number"),
    ({}, b'{"classes": [1], "schedule": ["linear"]}', 400, "schedule must be 'linear' or 'constant'"),
])
def test_malformed_requests_get_an_answer(studio, headers, body, status, words):
    hdrs = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
    port = studio.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/api/generate", skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", f"127.0.0.1:{port}")
    conn.putheader("Authorization", f"Bearer {studio.token}")
    for k, v in hdrs.items():
        if v is not None:
            conn.putheader(k, v)
    conn.endheaders()
    conn.send(body)
    if headers.get("Content-Length") == "100":
        conn.sock.shutdown(1)  # the client stops sending: the server must not wait forever
    r = conn.getresponse()
    answer = json.loads(r.read())
    conn.close()
    assert r.status == status and words in answer["error"], answer


def test_classes_error_names_the_field(studio):
    code, body, _ = _request(studio, "POST", "/api/generate", body={"classes": [1.5]})
    assert code == 400 and body["field"] == "classes"


def test_client_disconnects_are_one_log_line(studio):
    import sys

    try:
        raise BrokenPipeError(32, "Broken pipe")
    except BrokenPipeError:
        studio.handle_error(None, ("127.0.0.9", 1))
    assert studio.lines[-1] == "client 127.0.0.9 went away"
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        studio.handle_error(None, ("127.0.0.9", 1))
    assert studio.lines[-1] == "request from 127.0.0.9 failed: RuntimeError: boom"
    assert sys.exc_info() == (None, None, None)


def test_twenty_clients_at_once(studio):
    """Bounded load: 20 clients submit at once; every one gets its job done and its own images. The
    timeouts only guard against a hang (a loaded machine may take minutes), never against slowness."""
    results: list[tuple[int, dict]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(i):
        try:
            code, body, _ = _request(studio, "POST", "/api/generate", timeout=600,
                                     body={"classes": [i % 10], "steps": 1, "seed": i})
            if code == 202:
                job = studio.studio.job(body["id"])
                assert studio.studio.wait(job, timeout=600)
                code, body, _ = _request(studio, "GET", f"/api/jobs/{body['id']}", timeout=600)
            with lock:
                results.append((code, body))
        except BaseException as e:  # noqa: BLE001 - reported below, with the thread's error
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert not errors, errors
    assert len(results) == 20
    assert all(code == 200 and body["status"] == "done" for code, body in results), results
    # Each seed got its own images.
    grids = {_request(studio, "GET", body["grid_url"])[1] for _, body in results}
    assert len(grids) == 20


def test_resume_with_another_batch_size_is_refused(tmp_path):
    from bitdance.training.config import TrainConfig, TrainingError
    from bitdance.training.trainer import train

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(8):
            from PIL import Image

            Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(data / c / f"{i}.png")
    kw = dict(task="tokenizer", data=str(data), image_size=16, model="tiny-d4c16", out=str(tmp_path / "run"),
              lr=1e-3, warmup_steps=1, precision="fp32", progress=False, final_samples=False)
    train(TrainConfig(steps=2, batch_size=4, **kw))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = ckpt.stat().st_mtime_ns
    with pytest.raises(TrainingError, match=r"batch_size 4 -> 8.*lr 0.001 -> 0.002|batch_size 4 -> 8"):
        train(TrainConfig(steps=3, batch_size=8, resume=True, **{**kw, "lr": 2e-3}))
    assert ckpt.stat().st_mtime_ns == before
    # Run-control options (here: a longer run) may change on resume.
    assert train(TrainConfig(steps=3, batch_size=4, resume=True, **kw))["steps"] == 3


def test_saving_a_folder_over_a_file_is_refused(pipe, tmp_path, capsys):
    target = tmp_path / "model.pt"
    target.write_bytes(b"an unrelated file")
    with pytest.raises(CheckpointError, match="is an existing file, not a model folder"):
        pipe.save_pretrained(target)
    assert target.read_bytes() == b"an unrelated file" and sorted(tmp_path.iterdir()) == [target]


def test_page_runs_no_inline_code(studio):
    code, page, r = _request(studio, "GET", "/", token=False)
    csp = r.getheader("Content-Security-Policy")
    assert code == 200 and "unsafe-inline" not in csp and "script-src 'self'" in csp
    assert b"<script>" not in page and b"<style>" not in page and b' style="' not in page
    for name, ctype in (("studio.js", "text/javascript"), ("studio.css", "text/css")):
        code, body, r = _request(studio, "GET", f"/static/{name}", token=False)
        assert code == 200 and r.getheader("Content-Type").startswith(ctype) and len(body) > 100
    for path in ("/static/studio.html.bak", "/static/../studio.py", "/static/%2e%2e/studio.py", "/static/"):
        assert _request(studio, "GET", path, token=False)[0] == 404, path
