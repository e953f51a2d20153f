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
from bitdance.apps.studio_models import LIMITS, ServedModel, StudioError, model_names, named_pipes

__all__ = ["LIMITS", "Job", "Studio", "StudioError", "model_names"]

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
        items = named_pipes(pipes)
        if isinstance(class_names, dict):
            unknown = sorted(set(class_names) - {n for n, _ in items})
            if unknown:
                raise StudioError(f"class_names given for unknown model(s) {', '.join(unknown)}")
        self.models: dict[str, ServedModel] = {}
        for name, pipe in items:
            names = class_names.get(name) if isinstance(class_names, dict) else class_names
            if names is not None and getattr(pipe, "kind", "class_conditional") != "class_conditional":
                names = None  # a shared list is for the class-conditional models only
            self.models[name] = ServedModel(name, pipe, names)
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
