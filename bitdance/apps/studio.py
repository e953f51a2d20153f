"""``bitdance serve``: a small web studio for BitDance pipelines (standard library only).

One page (inline HTML/CSS/JS, no CDN: the machines it runs on are often offline) where a user picks a
model (when several are served: P, the tokens per AR step, is a property of a trained model, so
offering 1x/4x/16x/64x means serving several), classes (or types a prompt for a text-to-image model),
seed, steps, guidance and the number of images, and watches the image form patch by patch. Generation
requests of every model go through one worker thread and a FIFO queue, so concurrent users take turns
and see their position in the queue.

HTTP API (JSON; every error is ``{"error": message, "field": name-or-null}`` with a 4xx/5xx status)::

    GET  /                               the page
    GET  /api/info                       the default model's kind, classes / resolutions, limits,
                                         defaults, plus "models": the same for every model (with its
                                         "name", "parallel_num" = P, "ar_steps", "resolution")
    POST /api/generate                   {"model": "name" (default: the first), "classes": [3],
                                          "num_images": 4, "seed": 0, "steps": 25, "guidance": 4.0,
                                          "schedule": "linear"}  or, text-to-image,
                                         {"prompt": "...", "height": 512, "width": 512, ...}
                                         -> 202 {"id": ..., "position": jobs ahead}
    GET  /api/jobs/ID                    job state (status, position, step, num_steps, image URLs, error,
                                         params with "model" and "parallel_num")
    GET  /api/jobs/ID/events             the same as Server-Sent Events, with progress previews
    GET  /api/jobs/ID/grid.png           the finished images as one grid
    GET  /api/jobs/ID/images/K.png       image K
    GET  /api/history                    finished jobs, newest first

Python: ``Studio(pipe)`` or ``Studio({"name": pipe, ...})`` holds queue and jobs,
``make_server(pipes, host, port)`` returns a ready ``ThreadingHTTPServer`` (``server.url``,
``server.studio``), ``serve(models, ...)`` loads and serves.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bitdance.apps.studio_jobs import LIMITS, Job, Studio, StudioError, model_names

__all__ = ["LIMITS", "Job", "Studio", "StudioError", "make_server", "model_names", "serve"]

MAX_BODY = 8 * 1024 * 1024  # an edit carries its image and mask as PNG data URLs
KEEPALIVE_S = 15.0


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------
class StudioServer(ThreadingHTTPServer):
    """The studio's HTTP server. ``token`` authorises API calls (the page gets it as a same-site cookie;
    scripts send ``Authorization: Bearer TOKEN``); ``allowed_hosts`` are the host names a request's Host
    header may carry (IP literals always pass: DNS rebinding needs a name). See docs/security.md."""

    daemon_threads = True  # open event streams must not keep the process alive
    request_queue_size = 128  # socketserver's default backlog of 5 resets connections of a burst of users
    allow_reuse_address = True  # a restart right after Ctrl-C may rebind, but a live server still blocks the port
    studio: Studio | None = None
    token: str = ""
    allowed_hosts: frozenset[str] = frozenset()
    log: Callable[[str], None] = staticmethod(lambda msg: print(msg, file=sys.stderr, flush=True))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    @property
    def cookie_name(self) -> str:
        return f"bitdance_studio_{self.server_address[1]}"  # cookies ignore ports: one per studio

    def shutdown(self) -> None:
        if self.studio is not None:
            self.studio.close()  # wakes the event streams, so serve_forever's threads finish
        super().shutdown()

    def handle_error(self, request, client_address) -> None:
        """One line instead of socketserver's traceback (a request the handler did not answer itself)."""
        e = sys.exc_info()[1]
        if isinstance(e, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            self.log(f"client {client_address[0]} went away")
        else:
            self.log(f"request from {client_address[0]} failed: {type(e).__name__}: {e}")


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _host_name(host_header: str) -> str:
    """``Host`` header -> the lower-case name or address, without port or IPv6 brackets."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: StudioServer
    server_version = "bitdance-studio"
    protocol_version = "HTTP/1.0"  # one request per connection: a slow client holds only its own thread

    def log_message(self, format: str, *args) -> None:
        pass  # one line per poll/preview would drown the job log

    # ---- helpers ----
    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str, field: str | None = None) -> None:
        self._json(status, {"error": message, "field": field})

    @property
    def studio(self) -> Studio:
        return self.server.studio

    def _cookie_token(self) -> str | None:
        from http.cookies import CookieError, SimpleCookie

        raw = self.headers.get("Cookie")
        if not raw:
            return None
        try:
            jar = SimpleCookie(raw)
        except CookieError:
            return None
        morsel = jar.get(self.server.cookie_name)
        return morsel.value if morsel is not None else None

    def _guard(self, *, api: bool) -> None:
        """Refuse requests that a web page of another site (or a rebound DNS name) could make."""
        host = self.headers.get("Host")
        if not host:
            raise _Refused(400, "the request has no Host header")
        name = _host_name(host)
        if not _is_ip(name) and name not in self.server.allowed_hosts:
            raise _Refused(403, f"host {host!r} is not served here (DNS rebinding protection); start the studio "
                                f"with --allow-host {name} to allow it")
        origin = self.headers.get("Origin")
        if origin is not None:
            parts = urlsplit(origin) if origin != "null" else None
            if parts is None or parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
                raise _Refused(403, f"cross-origin request from {origin} refused")
        if api:
            import hmac

            auth = self.headers.get("Authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else self._cookie_token()
            if not given or not hmac.compare_digest(given.encode(), self.server.token.encode()):
                raise _Refused(401, "missing or wrong studio token: open the studio's page first (it sets a "
                                    "cookie), or send 'Authorization: Bearer TOKEN' with the token it printed")

    def _answer(self, route: Callable[[], None], *, api: bool) -> None:
        """Run a route; every failure becomes a status and a message, and a vanished client one log line."""
        try:
            try:
                self._guard(api=api)
                route()
            except _Refused as e:
                self._error(e.status, str(e))
            except StudioError as e:
                self._error(e.status, str(e), e.field)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                raise
            except Exception as e:  # noqa: BLE001 - answer instead of dropping the connection
                self.server.log(f"{self.command} {urlsplit(self.path).path} failed: {type(e).__name__}: {e}")
                self._error(500, f"internal error: {type(e).__name__}")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.server.log(f"client {self.client_address[0]} went away ({self.command} {urlsplit(self.path).path})")

    # ---- routes ----
    def do_HEAD(self) -> None:
        if urlsplit(self.path).path.endswith("/events"):
            return self._answer(lambda: self._error(405, "HEAD is not supported on an event stream"), api=False)
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        self._answer(lambda: self._get(path), api=path.startswith("/api/"))

    def _get(self, path: str) -> None:
        parts = [p for p in path.split("/") if p]
        if path == "/":
            cookie = f"{self.server.cookie_name}={self.server.token}; Path=/; SameSite=Strict; HttpOnly"
            self._send(200, _static("studio.html"), "text/html; charset=utf-8",
                       {"Content-Security-Policy": CSP, "Set-Cookie": cookie})
        elif len(parts) == 2 and parts[0] == "static" and parts[1] in STATIC_FILES:
            self._send(200, _static(parts[1]), STATIC_FILES[parts[1]])
        elif path == "/api/info":
            self._json(200, self.studio.info())
        elif path == "/api/history":
            self._json(200, self.studio.history())
        elif len(parts) >= 3 and parts[:2] == ["api", "jobs"]:
            job = self.studio.job(parts[2])
            if job is None:
                return self._error(404, f"no job {parts[2][:40]!r} (unknown, or dropped from the history)")
            rest = parts[3:]
            if not rest:
                self._json(200, self.studio.state(job))
            elif rest == ["events"]:
                self._events(job)
            elif rest == ["grid.png"] and job.grid is not None:
                self._png(job.grid, f"bitdance-{job.id}.png")
            elif len(rest) == 2 and rest[0] == "images" and rest[1].endswith(".png") and job.images \
                    and rest[1][:-4].isdigit() and len(rest[1]) < 12 and int(rest[1][:-4]) < len(job.images):
                k = int(rest[1][:-4])
                self._png(job.images[k], f"bitdance-{job.id}-{k}.png")
            elif rest[0] in ("grid.png", "images") and job.status != "done":
                self._error(409, f"job {job.id} is {job.status}; its images are not ready")
            else:
                self._error(404, f"not found: {path[:200]}")
        elif path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._error(404, f"not found: {path[:200]}")

    def _png(self, data: bytes, name: str) -> None:
        self._send(200, data, "image/png", {"Content-Disposition": f'inline; filename="{name}"'})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        self._answer(lambda: self._post(path), api=True)

    def _post(self, path: str) -> None:
        if path != "/api/generate":
            return self._error(404, f"not found: {path[:200]}")
        # JSON only: a form or text/plain POST is what a page of another site can send without asking first.
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self._error(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return self._error(411, "Content-Length is required")
        if not raw.strip().isdigit():
            return self._error(400, f"invalid Content-Length {raw[:20]!r}")
        n = int(raw)
        if n > MAX_BODY:
            return self._error(413, f"request body too large ({n} bytes; at most {MAX_BODY})")
        body = self.rfile.read(n)
        if len(body) < n:
            return self._error(400, f"the request body ended after {len(body)} of {n} bytes")
        try:
            payload = json.loads(body.decode("utf-8") or "null")
        except (UnicodeDecodeError, ValueError) as e:
            if "Exceeds the limit" in str(e):  # Python refuses integers past 4300 digits while parsing
                return self._error(400, "the request body holds a number of more than 4300 digits")
            return self._error(400, f"the request body is not valid JSON ({str(e)[:200]})")
        job = self.studio.submit(payload)
        self._json(202, {"id": job.id, "position": self.studio.position(job), "url": f"/api/jobs/{job.id}"})

    def _events(self, job: Job) -> None:
        """Server-Sent Events: one ``data:`` JSON line per change (state, plus any new preview)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        studio, sent_seq, last = self.studio, 0, None
        while True:
            update = studio.next_update(job, last, sent_seq, KEEPALIVE_S)
            if update is None:
                self.wfile.write(b": keep-alive\n\n")  # also finds out when the browser tab is gone
                self.wfile.flush()
                continue
            state, new = update
            msgs = [dict(state, preview={"step": pv.step, "src": pv.src}) for pv in new] or [state]
            sent_seq = new[-1].seq if new else sent_seq
            for m in msgs:
                self.wfile.write(b"data: " + json.dumps(m).encode() + b"\n\n")
            self.wfile.flush()
            last = state
            if state["status"] in ("done", "error") or studio.closed:
                return


def make_server(pipes, host: str = "127.0.0.1", port: int = 7860, *, allow_hosts=(), token: str | None = None,
                **studio_kw) -> StudioServer:
    """A bound (not yet serving) server for one pipeline, a list or a dict name -> pipeline (see
    :class:`Studio`); run ``server.serve_forever()`` (e.g. in a thread) and stop it
    with ``server.shutdown(); server.server_close()``. Port 0 picks a free port (see ``server.url``).
    ``allow_hosts``: host names besides ``localhost`` (and the bound name) that requests may address;
    ``token``: the API token (default: a fresh random one, ``server.token``)."""
    server = _bind(host, port, allow_hosts=allow_hosts, token=token)
    server.studio = Studio(pipes, **studio_kw)
    return server


def _allowed_hosts(host: str, extra) -> frozenset[str]:
    import socket

    names = {"localhost"}
    if not _is_ip(host.strip("[]")):
        names.add(host.lower())
    elif ipaddress.ip_address(host.strip("[]")).is_unspecified:  # every interface: the machine's own name too
        names.add(socket.gethostname().lower())
    for h in [extra] if isinstance(extra, str) else extra:
        h = str(h).strip().lower()
        if not h or any(c in h for c in "/@ \t") or h.count(":") > 0 and not _is_ip(h.strip("[]")):
            raise StudioError(f"--allow-host takes a host name without scheme or port, got {h!r}")
        names.add(h.strip("[]"))
    return frozenset(names)


def _bind(host: str, port: int, *, allow_hosts=(), token: str | None = None) -> StudioServer:
    import secrets

    if not 0 <= int(port) <= 65535:
        raise StudioError(f"port must be in 0..65535, got {port}")
    hosts = _allowed_hosts(host, allow_hosts)
    cls = StudioServer
    if ":" in host:  # IPv6 literal
        import socket

        cls = type("StudioServer6", (StudioServer,), {"address_family": socket.AF_INET6})
    try:
        server = cls((host, int(port)), _Handler)
    except OSError as e:
        import errno

        if e.errno == errno.EADDRINUSE:
            raise StudioError(f"port {port} on {host} is in use; stop the other server or pick another with "
                              f"--port") from None
        raise StudioError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.allowed_hosts, server.token = hosts, token or secrets.token_urlsafe(24)
    return server


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _tokenizers(paths: list, tokenizer) -> list:
    """``--tokenizer`` per model: given once, it goes to every official checkpoint file (folders bring
    their own; with a single model it is passed as given, as before); given once per ``--model``, it is
    aligned with them, ``-`` meaning none."""
    from pathlib import Path

    from bitdance.formats.weights import CheckpointError

    toks = [] if tokenizer is None else [tokenizer] if isinstance(tokenizer, (str, os.PathLike)) else list(tokenizer)
    if not toks:
        return [None] * len(paths)
    if len(toks) == len(paths):
        return [None if str(t) in ("-", "") else t for t in toks]
    if len(toks) != 1:
        raise CheckpointError(f"--tokenizer given {len(toks)} times for {len(paths)} models: give it once (for every "
                              "official .pt checkpoint) or once per --model ('-' for none)")
    files = [Path(p).is_file() for p in paths]
    if not any(files):
        raise CheckpointError(f"--tokenizer {toks[0]} is for official .pt checkpoints, but every --model is a "
                              "folder (folders bring their own tokenizer)")
    return [toks[0] if f else None for f in files]


def _load(path, tokenizer, device, dtype, weights=None):
    """One model, or a one-line CheckpointError that names its path."""
    from bitdance.formats.weights import CheckpointError
    from bitdance.pipelines.class_conditional import BitDancePipeline

    kw = {"tokenizer": tokenizer} if tokenizer else {}
    try:
        return BitDancePipeline.from_pretrained(path, device=device, dtype=dtype, weights=weights, **kw)
    except Exception as e:  # noqa: BLE001 - any failure becomes one line naming the model that failed
        msg = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, ValueError):  # CheckpointError/ConfigError are ValueErrors and say what is wrong
            msg = f"{type(e).__name__}: {msg}"
        raise CheckpointError(msg if str(path) in msg else f"cannot load --model {path}: {msg}") from None


def serve(model, *, tokenizer=None, host: str = "127.0.0.1", port: int = 7860, device=None, dtype=None,
          preview_interval: float = 0.3, class_names: list[str] | dict[str, list[str]] | None = None,
          allow_hosts=(), weights: str | None = None) -> None:
    """Load ``model`` (a path, or a list of paths: one after another, named by :func:`model_names`) and
    serve the studio until Ctrl-C. ``tokenizer``: a path or a list (see ``_tokenizers``). ``weights``: the
    storage of every model's linear layers (``"int8"``, ``"fp8"``, ``"bf16"``; None: as stored). The port is
    taken before the (possibly slow) model loads, so a port in use is reported at once."""

    from bitdance.formats.weights import CheckpointError

    paths = [model] if isinstance(model, (str, os.PathLike)) else list(model)
    if not paths:
        raise CheckpointError("no model to serve (give --model)")
    toks = _tokenizers(paths, tokenizer)
    from bitdance.formats.hub import resolve

    # every missing path at once, before a slow load of the ones before it; names are fetched (or found cached)
    found = [resolve(path) for path in paths]
    toks = [tok if tok is not None or f.tokenizer is None else f.tokenizer for tok, f in zip(toks, found)]
    names = model_names(paths)
    paths = [f.path for f in found]
    server = _bind(host, port, allow_hosts=allow_hosts)
    try:
        pipes = {}
        for i, (name, path, tok) in enumerate(zip(names, paths, toks)):
            if len(paths) > 1:
                print(f"loading model {i + 1}/{len(paths)}: {name} ({path})", flush=True)
            pipes[name] = _load(path, tok, device, dtype, weights)
        server.studio = Studio(pipes, class_names=class_names, preview_interval=preview_interval,
                               log=lambda m: print(m, flush=True))
        server.log = lambda m: print(m, flush=True)
        if not _is_loopback(host):
            print(f"warning: listening on {host}: anyone who can reach this address can open the page and use "
                  "the studio (the token only stops other web sites; see docs/security.md)", file=sys.stderr)
        models = server.studio.info()["models"]
        if len(models) == 1:
            print(f"BitDance studio: {server.url}  ({models[0]['description']}; Ctrl-C to stop)", flush=True)
        else:
            print(f"BitDance studio: {server.url}  ({len(models)} models; Ctrl-C to stop)", flush=True)
            for m in models:
                print(f"  {m['name']}: P {m['parallel_num']}x, {m['description']}", flush=True)
        print(f"API token for scripts (the page needs none): Authorization: Bearer {server.token}", flush=True)
        server.serve_forever()
    finally:
        if server.studio is not None:
            server.studio.close(timeout=1.0)
        server.server_close()


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------
# The page's style and script are files of the studio (no inline code, nothing from elsewhere).
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "form-action 'none'; base-uri 'none'; frame-ancestors 'none'")

STATIC = Path(__file__).resolve().parent / "static"
# Files the studio serves from bitdance/static: name -> content type. Nothing else under that folder is served.
STATIC_FILES = {"studio.css": "text/css; charset=utf-8", "studio.js": "text/javascript; charset=utf-8"}


def _static(name: str) -> bytes:
    return (STATIC / name).read_bytes()
