"""The studio's jobs: the served models, request validation, one worker and a FIFO queue (no HTTP).

:class:`Studio` is what :mod:`bitdance.apps.studio` serves over HTTP; it is usable alone (``submit`` / ``job``
/ ``wait``), e.g. from a notebook or another server.
"""

from __future__ import annotations

import base64
import collections
import io
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bitdance import validation
from bitdance.apps.studio_edit import parse_edit

__all__ = ["LIMITS", "Job", "Studio", "StudioError", "model_names"]

# Server-side bounds (the page shows the same ones, but only these are trusted): tighter than the library's
# (bitdance.validation) where one request would hold a shared queue for long.
LIMITS = {"steps": (1, 200), "num_images": (1, 16), "guidance": (1.0, 20.0), "prompt_chars": 500,
          "seed": (0, validation.MAX_SEED)}


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

    from bitdance.images import make_grid

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
        if "edit" not in p:
            return self.models[name].validate(p)
        p = dict(p)
        edit = parse_edit(p.pop("edit"), job_image=self._result_png, error=StudioError)
        if self.models[name].kind == "text_to_image":  # an edit keeps the image's size
            p["height"], p["width"] = (int(n) for n in edit["image"].shape[:2])
        params = self.models[name].validate(p)
        params["edit"] = {"source": edit["source"], "masked": edit["masked"]}
        params["edit_arrays"] = (edit["image"], edit["mask"])
        return params

    def _result_png(self, job_id: str, index: int) -> bytes | None:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.status != "done" or not 0 <= index < len(job.images):
                return None
            return job.images[index]

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

    @property
    def closed(self) -> bool:
        return self._closed

    def next_update(self, job: Job, last: dict[str, Any] | None, sent_seq: int, timeout: float):
        """Block until ``job`` changes from the ``last`` state sent, has previews after ``sent_seq``, ends, or
        the studio closes: ``(state, new previews)``; ``None`` after ``timeout`` seconds of no change."""
        with self._cond:  # an RLock: state() takes it again
            while True:
                state = self.state(job)
                new = [pv for pv in job.previews if pv.seq > sent_seq]
                if new or state != last or state["status"] in ("done", "error") or self._closed:
                    return state, new
                if not self._cond.wait(timeout):
                    return None

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
        from bitdance.images import to_uint8

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
        if "edit_arrays" in p:  # the masked region regenerates; every other token is kept as encoded
            image, mask = p["edit_arrays"]
            cond = {"class_labels": p["labels"], "guidance_schedule": p["schedule"]} \
                if model.kind == "class_conditional" else {"prompt": [p["prompt"]] * p["num_images"]}
            out = pipe.edit(image, mask, num_inference_steps=p["steps"], guidance_scale=p["guidance"],
                            generator=gen, output_type="np", callback=progress, **cond)
        elif model.kind == "class_conditional":
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
    return {k: v for k, v in params.items() if k not in ("labels", "edit_arrays")}


def _summary(p: dict[str, Any]) -> str:
    what = f"classes {p['classes']}" if "classes" in p else f"prompt {p['prompt'][:60]!r} {p['height']}x{p['width']}"
    edit = f", edit of {p['edit']['source']} ({100 * p['edit']['masked']:.0f}% painted)" if "edit" in p else ""
    return (f"{p['model']} (P {p['parallel_num']}x): {p['num_images']} image(s), {what}{edit}, seed {p['seed']}, "
            f"{p['steps']} steps, guidance {p['guidance']:g}")
