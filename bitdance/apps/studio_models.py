"""The studio's served models: what the page is told about each (:meth:`ServedModel.info`) and how a
request for it is checked (:meth:`ServedModel.validate`), with the server-side bounds (:data:`LIMITS`)."""

from __future__ import annotations

from typing import Any

from bitdance import validation

__all__ = ["LIMITS", "StudioError", "ServedModel", "model_names", "named_pipes"]

# Server-side bounds (the page shows the same ones, but only these are trusted): tighter than the library's
# (bitdance.validation) where one request would hold a shared queue for long.
LIMITS = {"steps": (1, 200), "num_images": (1, 16), "guidance": (1.0, 20.0), "prompt_chars": 500,
          "seed": (0, validation.MAX_SEED)}


class StudioError(ValueError):
    """A request the studio refuses; ``status`` is the HTTP status, ``field`` the offending input."""

    def __init__(self, message: str, *, status: int = 400, field: str | None = None):
        super().__init__(message)
        self.status, self.field = status, field



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


class ServedModel:
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


def named_pipes(pipes) -> list[tuple[str, Any]]:
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
