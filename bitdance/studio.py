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

import base64
import collections
import io
import ipaddress
import json
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import validation

__all__ = ["LIMITS", "Job", "Studio", "StudioError", "make_server", "model_names", "serve"]

# Server-side bounds (the page shows the same ones, but only these are trusted): tighter than the library's
# (bitdance.validation) where one request would hold a shared queue for long.
LIMITS = {"steps": (1, 200), "num_images": (1, 16), "guidance": (1.0, 20.0), "prompt_chars": 500,
          "seed": (0, validation.MAX_SEED)}
MAX_BODY = 64 * 1024
KEEPALIVE_S = 15.0


class StudioError(ValueError):
    """A request the studio refuses; ``status`` is the HTTP status, ``field`` the offending input."""

    def __init__(self, message: str, *, status: int = 400, field: str | None = None):
        super().__init__(message)
        self.status, self.field = status, field


@dataclass
class _Preview:
    seq: int
    step: int  # AR steps done when it was decoded
    src: str  # data:image/png;base64,...


@dataclass(eq=False)  # identity semantics: jobs are compared in the pending list
class Job:
    id: str
    params: dict[str, Any]
    status: str = "queued"  # queued -> running -> done | error
    step: int = 0  # AR steps done
    num_steps: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    images: list[bytes] = field(default_factory=list)  # PNG per image
    grid: bytes | None = None
    # Only the newest previews are kept: a client that falls behind skips to the latest picture
    # instead of the server buffering every partial image of a long generation.
    previews: collections.deque = field(default_factory=lambda: collections.deque(maxlen=8))
    preview_seq: int = 0

    @property
    def seconds(self) -> float | None:
        return None if self.started is None or self.finished is None else round(self.finished - self.started, 2)


def _png(array, *, fast: bool = False) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # Previews are thrown away a moment later: trade size for encoding time.
    Image.fromarray(array).save(buf, format="PNG", compress_level=1 if fast else 6)
    return buf.getvalue()


def _grid(images) -> Any:
    import numpy as np

    from .images import make_grid

    arr = np.asarray(images)
    return make_grid(arr, min(len(arr), 4))


def _as_uint8(images) -> Any:
    """Pipeline output (``output_type="np"`` array, or a list of PIL images) -> (B, H, W, 3) uint8."""
    import numpy as np

    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    return np.ascontiguousarray(images, dtype=np.uint8)


def _t2i_config(pipe) -> Any:
    """The object with ``check_resolution`` of a text-to-image pipeline (its config), if any."""
    for owner in (pipe, getattr(pipe, "model", None), getattr(pipe, "generator", None),
                  getattr(pipe, "transformer", None)):
        cfg = getattr(owner, "config", None)
        if cfg is not None and hasattr(cfg, "check_resolution"):
            return cfg
    return None


def _int(p: dict, name: str, default: int, bounds: tuple[int, int], what: str | None = None,
         field: str | None = None) -> int:
    """A JSON integer within bounds: no coercion of strings, floats or booleans (the shared rules of
    :mod:`bitdance.validation`), refused with the field named."""
    try:
        return validation.integer(p.get(name, default), what or name, *bounds)
    except validation.InputError as e:
        raise StudioError(str(e), field=field or name) from None


def model_names(paths) -> list[str]:
    """Display names for ``--model`` paths: the file stem or folder name; paths sharing one get their
    parent folder in front (``run1/model``), and any name still taken gets ``-2``, ``-3``, ..."""
    from pathlib import Path

    ps = [Path(p).resolve() for p in paths]
    base = [p.stem if p.is_file() else p.name for p in ps]
    wanted = [f"{p.parent.name}/{b}" if base.count(b) > 1 and p.parent.name else b for p, b in zip(ps, base)]
    out: list[str] = []
    for n in wanted:
        cand, k = n, 1
        while cand in out:
            k += 1
            cand = f"{n}-{k}"
        out.append(cand)
    return out


class _Model:
    """One served pipeline: its description for the page and the validation of its own fields."""

    def __init__(self, name: str, pipe, class_names: list[str] | None = None):
        self.name, self.pipe = name, pipe
        self.kind = getattr(pipe, "kind", "class_conditional")
        if self.kind not in ("class_conditional", "text_to_image"):
            raise StudioError(f"model {name!r}: unsupported pipeline kind {self.kind!r}")
        self.num_classes = int(pipe.config.num_classes) if self.kind == "class_conditional" else 0
        names = class_names if class_names is not None else (getattr(pipe, "meta", None) or {}).get("class_names")
        if names is not None and (not isinstance(names, (list, tuple)) or len(names) != self.num_classes):
            raise StudioError(f"class_names must list {self.num_classes} names, got "
                              f"{len(names) if isinstance(names, (list, tuple)) else type(names).__name__}"
                              f" (model {name!r})")
        self.class_names = [str(n) for n in names] if names is not None else None
        self._t2i = _t2i_config(pipe) if self.kind == "text_to_image" else None
        cfg = pipe.config if self.kind == "class_conditional" else self._t2i
        self.parallel_num = int(getattr(cfg, "parallel_num", 0) or 0)  # P: tokens per AR step

    def resolutions(self) -> list[list[int]]:
        if self.kind != "text_to_image":
            size = int(self.pipe.config.image_size)
            return [[size, size]]
        res = getattr(self._t2i, "resolutions", None) or []
        return [[int(h), int(w)] for h, w in res]

    def info(self) -> dict[str, Any]:
        res = self.resolutions()
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "parallel_num": self.parallel_num,
            "limits": {k: list(v) if isinstance(v, tuple) else v for k, v in LIMITS.items()},
            "defaults": {"steps": 25, "guidance": 4.0 if self.kind == "class_conditional" else 7.5,
                         "num_images": 4 if self.kind == "class_conditional" else 1, "seed": 0},
            "max_images": LIMITS["num_images"][1], "resolutions": res,
        }
        if self.kind == "class_conditional":
            cfg = self.pipe.config
            out.update(num_classes=self.num_classes, class_names=self.class_names, image_size=int(cfg.image_size),
                       ar_steps=int(cfg.num_steps), resolution=f"{cfg.image_size}x{cfg.image_size}",
                       schedules=["linear", "constant"])
            out["description"] = (f"class-conditional, {self.num_classes} classes, {cfg.image_size}x{cfg.image_size}"
                                  f" px, {cfg.num_steps} AR steps of {cfg.parallel_num} token{'s' * (cfg.parallel_num != 1)}")
        else:
            cfg = self._t2i
            anyres = bool(getattr(cfg, "allow_any_resolution", False))
            down = int(getattr(cfg, "down_factor", 16))
            unit = down * int(getattr(cfg, "patch_size", 1))
            out.update(any_resolution=anyres or not res, resolution_unit=unit,
                       max_resolution=int(getattr(cfg, "max_res_tokens", 128)) * down)
            try:  # the pipeline's own choice (largest allowed square), else the first listed
                default = list(self.pipe.default_resolution)
            except (AttributeError, ValueError):
                default = res[0] if res else [512, 512]
            out["defaults"].update(height=default[0], width=default[1])
            # The AR step count depends on the resolution: the one of the default is shown.
            out.update(ar_steps=(default[0] // unit) * (default[1] // unit), resolution=f"{default[0]}x{default[1]}")
            out["description"] = (f"text-to-image, {out['ar_steps']} AR steps of {self.parallel_num} token{'s' * (self.parallel_num != 1)} at "
                                  f"{default[0]}x{default[1]}")
        return out

    def validate(self, p: dict) -> dict[str, Any]:
        common = {"num_images", "seed", "steps", "guidance", "model"}
        allowed = common | ({"classes", "schedule"} if self.kind == "class_conditional"
                            else {"prompt", "height", "width"})
        unknown = sorted(set(p) - allowed)
        if unknown:
            hint = " (this model is text-to-image: send a prompt)" if "classes" in unknown else \
                " (this model is class-conditional: send classes)" if "prompt" in unknown else ""
            raise StudioError(f"unknown field(s) {', '.join(unknown)}{hint}; allowed: {', '.join(sorted(allowed))}",
                              field=unknown[0])
        steps = _int(p, "steps", 25, LIMITS["steps"], "steps")
        seed = _int(p, "seed", 0, LIMITS["seed"], "seed")
        try:
            guidance = validation.number(p.get("guidance", 4.0 if self.kind == "class_conditional" else 7.5),
                                         "guidance", *LIMITS["guidance"])
        except validation.InputError as e:
            raise StudioError(f"{e} (1 = no guidance)", field="guidance") from None
        out: dict[str, Any] = {"model": self.name, "parallel_num": self.parallel_num,
                               "steps": steps, "seed": seed, "guidance": guidance}

        if self.kind == "class_conditional":
            classes = p.get("classes")
            if isinstance(classes, (int, str)) and not isinstance(classes, bool):
                classes = [classes]
            if not isinstance(classes, list) or not classes:
                raise StudioError("choose at least one class", field="classes")
            ids = []
            for c in classes:
                cid = _int({"c": c}, "c", 0, (-(2**31), 2**31), "class id", field="classes")
                if not 0 <= cid < self.num_classes:
                    raise StudioError(f"class id {cid} is out of range: this model has {self.num_classes} classes "
                                      f"(ids 0 to {self.num_classes - 1})", field="classes")
                ids.append(cid)
            n = _int(p, "num_images", len(ids), LIMITS["num_images"], "number of images")
            if n < len(ids):
                raise StudioError(f"number of images ({n}) is smaller than the number of chosen classes "
                                  f"({len(ids)}): raise it or choose fewer classes", field="num_images")
            schedule = p.get("schedule", "linear")
            if not isinstance(schedule, str) or schedule not in ("linear", "constant"):
                raise StudioError(f"schedule must be 'linear' or 'constant', got {schedule!r}", field="schedule")
            out.update(classes=ids, labels=[ids[i % len(ids)] for i in range(n)], num_images=n, schedule=schedule)
        else:
            prompt = p.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise StudioError("type a prompt", field="prompt")
            prompt = prompt.strip()
            if len(prompt) > LIMITS["prompt_chars"]:
                raise StudioError(f"the prompt has {len(prompt)} characters; at most {LIMITS['prompt_chars']} "
                                  "are allowed", field="prompt")
            n = _int(p, "num_images", 1, LIMITS["num_images"], "number of images")
            d = self.info()["defaults"]
            h = _int(p, "height", d["height"], (1, 16384), "height")
            w = _int(p, "width", d["width"], (1, 16384), "width")
            if self._t2i is not None:
                try:
                    self._t2i.check_resolution(h, w)
                except ValueError as e:
                    raise StudioError(str(e), field="height") from None
            elif h % 16 or w % 16 or max(h, w) > 2048:
                raise StudioError(f"resolution {h}x{w} (HxW) is not allowed: use multiples of 16 px up to 2048",
                                  field="height")
            out.update(prompt=prompt, num_images=n, height=h, width=w)
        return out


def _named_pipes(pipes) -> list[tuple[str, Any]]:
    if isinstance(pipes, dict):
        items = list(pipes.items())
    elif isinstance(pipes, (list, tuple)):
        items = [(f"model-{i + 1}", p) for i, p in enumerate(pipes)]
    else:
        items = [("model", pipes)]
    if not items:
        raise StudioError("the studio needs at least one model")
    for name, _ in items:
        if not isinstance(name, str) or not name.strip():
            raise StudioError(f"model names must be non-empty strings, got {name!r}")
    return items


class Studio:
    """Queue, worker and jobs behind the web page; usable without HTTP (``submit`` / ``job``).

    ``pipes``: one pipeline, a list (named ``model-1``, ``model-2``, ...) or a dict name -> pipeline;
    the first is the default of a request without ``"model"``. All models share one worker and queue.
    ``class_names``: a list for every class-conditional model, or a dict name -> list.
    ``preview_interval``: least seconds between two progress decodes (0 = every step). The real gap is
    also at least twice the last decode's duration, so decoding never takes more than ~1/3 of the time
    of a big model's generation. ``start=False`` leaves the worker stopped until ``start()`` (tests use
    it to fill the queue deterministically).
    """

    def __init__(self, pipes, *, class_names: list[str] | dict[str, list[str]] | None = None,
                 preview_interval: float = 0.3, max_queue: int = 32, history_size: int = 50, start: bool = True,
                 log: Callable[[str], None] | None = None):
        items = _named_pipes(pipes)
        if isinstance(class_names, dict):
            unknown = sorted(set(class_names) - {n for n, _ in items})
            if unknown:
                raise StudioError(f"class_names given for unknown model(s) {', '.join(unknown)}")
        self.models: dict[str, _Model] = {}
        for name, pipe in items:
            names = class_names.get(name) if isinstance(class_names, dict) else class_names
            if names is not None and getattr(pipe, "kind", "class_conditional") != "class_conditional":
                names = None  # a shared list is for the class-conditional models only
            self.models[name] = _Model(name, pipe, names)
        self.default_model = items[0][0]
        self.preview_interval = float(preview_interval)
        self.max_queue, self.history_size = int(max_queue), int(history_size)
        self.log = log or (lambda msg: None)

        self._cond = threading.Condition()  # guards everything below; notified on every job change
        self._jobs: dict[str, Job] = {}
        self._pending: list[Job] = []  # queued, in order
        self._running: Job | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._closed = False
        self._worker: threading.Thread | None = None
        if start:
            self.start()

    # ---- model description --------------------------------------------------------------
    @property
    def pipe(self):
        """The default (first) model's pipeline."""
        return self.models[self.default_model].pipe

    @property
    def kind(self) -> str:
        return self.models[self.default_model].kind

    def info(self) -> dict[str, Any]:
        """The default model's description at the top level (what a one-model client reads), plus
        ``models``: every model's, in order."""
        models = [m.info() for m in self.models.values()]
        return {**models[0], "models": models, "default_model": self.default_model}

    def validate(self, p: Any) -> dict[str, Any]:
        """A request body -> clean parameters, or StudioError with a message a user can act on."""
        if not isinstance(p, dict):
            raise StudioError("the request body must be a JSON object")
        name = p.get("model", self.default_model)
        if not isinstance(name, str) or name not in self.models:
            raise StudioError(f"unknown model {name!r}; this studio serves: {', '.join(self.models)}",
                              field="model")
        return self.models[name].validate(p)

    # ---- queue ------------------------------------------------------------------------------
    def submit(self, payload: Any) -> Job:
        params = self.validate(payload)
        with self._cond:
            if self._closed:
                raise StudioError("the studio is shutting down", status=503)
            if len(self._pending) >= self.max_queue:
                raise StudioError(f"the queue is full ({self.max_queue} requests waiting); try again later",
                                  status=503)
            job = Job(id=uuid.uuid4().hex[:16], params=params)
            self._jobs[job.id] = job
            self._pending.append(job)
            self._evict()
            self._cond.notify_all()
        self._queue.put(job)
        return job

    def _evict(self) -> None:
        """Forget the oldest finished jobs beyond ``history_size`` (bounded memory on a long-running server)."""
        finished = [j for j in self._jobs.values() if j.status in ("done", "error")]
        for j in sorted(finished, key=lambda j: j.created)[:max(0, len(finished) - self.history_size)]:
            del self._jobs[j.id]

    def job(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """Jobs ahead of this one (the running one included); 0 once it runs."""
        with self._cond:
            if job in self._pending:
                return self._pending.index(job) + (self._running is not None)
            return 0

    def state(self, job: Job) -> dict[str, Any]:
        with self._cond:
            s = {"id": job.id, "status": job.status, "position": self.position(job), "step": job.step,
                 "num_steps": job.num_steps, "error": job.error, "seconds": job.seconds,
                 "params": _public(job.params)}
            if job.status == "done":
                s["grid_url"] = f"/api/jobs/{job.id}/grid.png"
                s["images"] = [f"/api/jobs/{job.id}/images/{k}.png" for k in range(len(job.images))]
            return s

    def history(self) -> list[dict[str, Any]]:
        with self._cond:
            done = sorted((j for j in self._jobs.values() if j.status == "done"), key=lambda j: -j.finished)
        return [self.state(j) for j in done]

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Block until the job is done or failed; False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while job.status not in ("done", "error"):
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="bitdance-studio-worker", daemon=True)
            self._worker.start()

    def close(self, timeout: float | None = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout)

    # ---- the worker ---------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._cond:
                self._pending.remove(job)
                self._running, job.status, job.started = job, "running", time.time()
                self._cond.notify_all()
            self.log(f"job {job.id}: {_summary(job.params)}")
            try:
                self._run(job)
                with self._cond:
                    job.status = "done"
            except Exception as e:  # noqa: BLE001 - a failed job must not take the worker (and every later job) down
                if not isinstance(e, ValueError):  # ValueError: a refused input, the message says it all
                    traceback.print_exc(file=sys.stderr)
                with self._cond:
                    job.status, job.error = "error", f"generation failed: {type(e).__name__}: {e}"
            finally:
                with self._cond:
                    job.finished = time.time()
                    job.previews.clear()
                    self._running = None
                    self._evict()
                    self._cond.notify_all()
            self.log(f"job {job.id}: {job.status} in {job.seconds:.1f}s" + (f" ({job.error})" if job.error else ""))

    def _run(self, job: Job) -> None:
        from .images import to_uint8

        p = job.params
        model = self.models[p["model"]]
        pipe = model.pipe
        last = {"end": 0.0, "cost": 0.0}

        def progress(step: int, num_steps: int, latents) -> None:
            done = step + 1
            with self._cond:
                job.step, job.num_steps = done, num_steps
                self._cond.notify_all()
            now = time.monotonic()
            # The last step needs no preview: the final images are published right after it.
            gap = max(self.preview_interval, 2 * last["cost"]) if self.preview_interval > 0 else 0.0
            if done >= num_steps or now - last["end"] < gap:
                return
            t0 = time.monotonic()
            src = "data:image/png;base64," + base64.b64encode(
                _png(_grid(to_uint8(pipe.decode(latents)).numpy()), fast=True)).decode("ascii")
            last["end"] = time.monotonic()
            last["cost"] = last["end"] - t0
            with self._cond:
                job.preview_seq += 1
                job.previews.append(_Preview(job.preview_seq, done, src))
                self._cond.notify_all()

        gen = validation.seeded(p["seed"], getattr(pipe, "device", "cpu"))
        if model.kind == "class_conditional":
            out = pipe(p["labels"], num_inference_steps=p["steps"], guidance_scale=p["guidance"],
                       guidance_schedule=p["schedule"], generator=gen, output_type="np", callback=progress)
        else:
            prompts = p["prompt"] if p["num_images"] == 1 else [p["prompt"]] * p["num_images"]
            out = pipe(prompts, height=p["height"], width=p["width"], num_inference_steps=p["steps"],
                       guidance_scale=p["guidance"], generator=gen, output_type="np", callback=progress)
        images = _as_uint8(out.images)
        pngs, grid = [_png(im) for im in images], _png(_grid(images))
        with self._cond:
            job.images, job.grid = pngs, grid
            job.step = job.num_steps = max(job.num_steps, 1)


def _public(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "labels"}


def _summary(p: dict[str, Any]) -> str:
    what = f"classes {p['classes']}" if "classes" in p else f"prompt {p['prompt'][:60]!r} {p['height']}x{p['width']}"
    return f"{p['model']} (P {p['parallel_num']}x): {p['num_images']} image(s), {what}, seed {p['seed']}, {p['steps']} steps, guidance {p['guidance']:g}"


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------
class StudioServer(ThreadingHTTPServer):
    """The studio's HTTP server. ``token`` authorises API calls (the page gets it as a same-site cookie;
    scripts send ``Authorization: Bearer TOKEN``); ``allowed_hosts`` are the host names a request's Host
    header may carry (IP literals always pass: DNS rebinding needs a name). See docs/security.md."""

    daemon_threads = True  # open event streams must not keep the process alive
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
            keepalive = False
            with studio._cond:  # an RLock: state() may take it again
                while True:
                    state = studio.state(job)
                    new = [pv for pv in job.previews if pv.seq > sent_seq]
                    if new or state != last or state["status"] in ("done", "error") or studio._closed:
                        break
                    if not studio._cond.wait(KEEPALIVE_S):
                        keepalive = True
                        break
            if keepalive:
                self.wfile.write(b": keep-alive\n\n")  # also finds out when the browser tab is gone
                self.wfile.flush()
                continue
            msgs = [dict(state, preview={"step": pv.step, "src": pv.src}) for pv in new] or [state]
            sent_seq = new[-1].seq if new else sent_seq
            for m in msgs:
                self.wfile.write(b"data: " + json.dumps(m).encode() + b"\n\n")
            self.wfile.flush()
            last = state
            if state["status"] in ("done", "error") or studio._closed:
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

    from .checkpoint import CheckpointError

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


def _load(path, tokenizer, device, dtype):
    """One model, or a one-line CheckpointError that names its path."""
    from .checkpoint import CheckpointError
    from .pipeline import BitDancePipeline

    kw = {"tokenizer": tokenizer} if tokenizer else {}
    try:
        return BitDancePipeline.from_pretrained(path, device=device, dtype=dtype, **kw)
    except Exception as e:  # noqa: BLE001 - any failure becomes one line naming the model that failed
        msg = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, ValueError):  # CheckpointError/ConfigError are ValueErrors and say what is wrong
            msg = f"{type(e).__name__}: {msg}"
        raise CheckpointError(msg if str(path) in msg else f"cannot load --model {path}: {msg}") from None


def serve(model, *, tokenizer=None, host: str = "127.0.0.1", port: int = 7860, device=None, dtype=None,
          preview_interval: float = 0.3, class_names: list[str] | dict[str, list[str]] | None = None,
          allow_hosts=()) -> None:
    """Load ``model`` (a path, or a list of paths: one after another, named by :func:`model_names`) and
    serve the studio until Ctrl-C. ``tokenizer``: a path or a list (see ``_tokenizers``). The port is
    taken before the (possibly slow) model loads, so a port in use is reported at once."""
    from pathlib import Path

    from .checkpoint import CheckpointError

    paths = [model] if isinstance(model, (str, os.PathLike)) else list(model)
    if not paths:
        raise CheckpointError("no model to serve (give --model)")
    toks = _tokenizers(paths, tokenizer)
    for path in paths:  # every missing path at once, before a slow load of the ones before it
        if not Path(path).exists():
            raise CheckpointError(f"{path}: no such file or folder")
    names = model_names(paths)
    server = _bind(host, port, allow_hosts=allow_hosts)
    try:
        pipes = {}
        for i, (name, path, tok) in enumerate(zip(names, paths, toks)):
            if len(paths) > 1:
                print(f"loading model {i + 1}/{len(paths)}: {name} ({path})", flush=True)
            pipes[name] = _load(path, tok, device, dtype)
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
