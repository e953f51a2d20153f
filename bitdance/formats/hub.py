"""Released models by name: short names and Hugging Face repository ids, fetched with ``huggingface_hub``.

Three forms name a model wherever a path is accepted (``from_pretrained``, the CLI):

* a local file or folder: used as it is;
* a short name from :data:`RELEASED` (``"BitDance-B-16x"``, ``"BitDance-14B-64x"``, ``"d32c256"``), listed
  by ``bitdance presets --released``;
* a repository id ``org/name`` (``"shallowdream204/BitDance-ImageNet"``, with ``model="BitDance_B_16x.pt"``
  where the repository holds several models).

Downloads go through the hub's own cache (``HF_HOME`` / ``HF_HUB_CACHE`` / ``cache_dir=``), honour
``revision=``, ``local_files_only=`` and ``HF_HUB_OFFLINE``, take tokens from the usual places, show the
hub's progress bars, and fetch only the files the pipeline reads. Nothing fetched is unpickled outside the
allow-list of :mod:`bitdance.formats.weights`: ``.pt`` files go through the same loader as local ones.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from bitdance.formats.weights import CheckpointError

__all__ = ["Released", "RELEASED", "Resolved", "HubError", "resolve", "download", "is_repo_id", "released_table"]


class HubError(CheckpointError):
    """A name that could not be resolved or fetched (offline and not cached, unknown name, missing file)."""


@dataclass(frozen=True)
class Released:
    """One released model: where it lives and which files a pipeline needs from there."""

    name: str  # short name
    repo_id: str
    kind: str  # "class_conditional" | "text_to_image" | "tokenizer"
    files: tuple[str, ...]  # the model's files (for a folder: glob patterns of what is read)
    tokenizer: tuple[str, ...] = ()  # class-conditional: the tokenizer's files in the same repository
    about: str = ""


_IMAGENET = "shallowdream204/BitDance-ImageNet"
_TOKENIZERS = "shallowdream204/BitDance-Tokenizer"
# What a folder's loader reads: configs and safetensors (ours), and for text-to-image the Qwen3 LLM (config,
# shards + index), its tokenizer files (merges.txt) and the image tokenizer, head and projector. Anything else
# in the repository (images, README, training leftovers) is not fetched.
_FOLDER_PATTERNS = ("*.json", "*.safetensors", "*.txt")


def _imagenet(size: str, p: int, params: str, fid: str) -> Released:
    return Released(f"BitDance-{size}-{p}x", _IMAGENET, "class_conditional", (f"BitDance_{size}_{p}x.pt",),
                    tokenizer=("ae_d16c32.pt",), about=f"ImageNet 256, {params} params, FID {fid}")


def _tokenizer(key: str, about: str) -> Released:
    return Released(key, _TOKENIZERS, "tokenizer", (f"ae_{key}.safetensors", f"ae_{key}_config.json"), about=about)


RELEASED: dict[str, Released] = {r.name: r for r in (
    _imagenet("B", 1, "242M", "1.68"),
    _imagenet("B", 4, "260M", "1.69"),
    _imagenet("B", 16, "260M", "1.91"),
    _imagenet("L", 1, "527M", "1.31"),
    _imagenet("H", 1, "1.0B", "1.24"),
    Released("BitDance-14B-64x", "shallowdream204/BitDance-14B-64x", "text_to_image", _FOLDER_PATTERNS,
             about="text-to-image on Qwen3-14B, 64 tokens per step, 1024 px"),
    Released("BitDance-14B-16x", "shallowdream204/BitDance-14B-16x", "text_to_image", _FOLDER_PATTERNS,
             about="text-to-image on Qwen3-14B, 16 tokens per step, 512 and 1024 px"),
    _tokenizer("d16c32", "16x down, 32 bits (2^32 codes)"),
    _tokenizer("d32c128", "32x down, 128 bits (2^128 codes)"),
    _tokenizer("d32c256", "32x down, 256 bits (2^256 codes)"),
)}
_BY_REPO: dict[str, list[Released]] = {}
for _r in RELEASED.values():
    _BY_REPO.setdefault(_r.repo_id, []).append(_r)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


@dataclass(frozen=True)
class Resolved:
    """A model on disk: ``path`` (a file or a folder), its ``tokenizer`` file where the release keeps it
    apart (the ImageNet checkpoints), the release it came from (None for a local path)."""

    path: Path
    tokenizer: Path | None = None
    release: Released | None = None


def released_table() -> list[dict[str, str]]:
    """Rows for ``bitdance presets --released``."""
    return [{"name": r.name, "kind": r.kind, "repository": r.repo_id,
             "files": ", ".join(r.files + r.tokenizer), "about": r.about} for r in RELEASED.values()]


def _release_for(repo_id: str, model: str | None) -> Released | None:
    """The release of ``repo_id`` that ``model`` (a file name, a short name or None) picks."""
    known = _BY_REPO.get(repo_id)
    if not known:
        return None
    if model is None:
        if len(known) == 1:
            return known[0]
        choices = ", ".join(f for r in known for f in r.files if not f.endswith(".json"))
        raise HubError(f"{repo_id} holds several models; pick one with model= (--model-file on the command "
                       f"line): {choices}")
    for r in known:
        if model in (r.name, *r.files) or model == Path(r.files[0]).stem:
            return r
    return None  # another file of a known repository: fetched as named


def resolve(name: str | os.PathLike, *, model: str | None = None, revision: str | None = None,
            cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
            token: str | bool | None = None) -> Resolved:
    """A local path, short name or repository id -> the files on disk (downloading what is missing).

    ``model``: which file of a repository that holds several (``"BitDance_B_16x.pt"``). An existing local path
    wins over a name that looks like a repository id.
    """
    text = os.fspath(name)
    if Path(text).exists():
        if model is not None:
            raise HubError(f"{text}: model= picks a file of a repository; this is a local path")
        return Resolved(Path(text))
    release = RELEASED.get(text)
    if release is not None:
        if model is not None and _release_for(release.repo_id, model) is not release:
            raise HubError(f"{text} is one model; model={model!r} applies to repository ids")
        repo_id = release.repo_id
    elif is_repo_id(text):
        repo_id = text
        release = _release_for(repo_id, model)
    else:
        close = [n for n in RELEASED if n.lower() == text.lower()]
        if close:
            raise HubError(f"{text}: no such file or folder (did you mean the released model {close[0]!r}?)")
        if os.sep in text or "." in Path(text).name:  # meant as a path
            raise HubError(f"{text}: no such file or folder")
        raise HubError(f"{text}: no such file or folder, and not a released model name ({', '.join(RELEASED)}) "
                       "or a repository id (org/name)")
    kw = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token, shown=text)
    if release is None:  # a repository we do not list: one named file, or a folder of our own format
        if model is not None:
            return Resolved(_file(repo_id, model, **kw))
        return Resolved(_folder(repo_id, _FOLDER_PATTERNS, **kw))
    if release.kind == "text_to_image":
        return Resolved(_folder(repo_id, release.files, **kw), release=release)
    files = [_file(repo_id, f, **kw) for f in release.files]
    tok = [_file(repo_id, f, **kw) for f in release.tokenizer]
    return Resolved(files[0], tokenizer=tok[0] if tok else None, release=release)


def _offline(local_files_only: bool | None) -> bool:
    from huggingface_hub import constants

    return bool(local_files_only) or constants.HF_HUB_OFFLINE


def _not_cached(repo_id: str, what: str, revision: str | None, shown: str) -> HubError:
    rev = f" --revision {revision}" if revision else ""
    return HubError(f"{shown}: {what} is not in the Hugging Face cache and downloads are off (HF_HUB_OFFLINE "
                    f"or local_files_only); on a machine with internet run `bitdance download {shown}{rev}`, "
                    f"or copy its cache folder (models--{repo_id.replace('/', '--')}) here")


def _fetch(call, repo_id: str, what: str, *, revision, local_files_only, shown) -> Path:
    """``call()`` (a hub download) with the hub's errors turned into one line each."""
    from huggingface_hub import errors

    try:
        return Path(call())
    except errors.LocalEntryNotFoundError:
        if _offline(local_files_only):
            raise _not_cached(repo_id, what, revision, shown) from None
        raise HubError(f"{repo_id}: could not download {what} (no connection to the Hub?)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{repo_id}: no revision {revision!r}") from None
    except errors.EntryNotFoundError:
        raise HubError(f"{repo_id}: no file {what!r} (at revision {revision or 'main'})") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such repository on the Hub (or it is private: log in with "
                       "`hf auth login` or set HF_TOKEN)") from None


def _file(repo_id: str, filename: str, *, revision, cache_dir, local_files_only, token, shown) -> Path:
    import huggingface_hub as hub

    return _fetch(lambda: hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                              local_files_only=bool(local_files_only), token=token),
                  repo_id, filename, revision=revision, local_files_only=local_files_only, shown=shown)


def _folder(repo_id: str, patterns: tuple[str, ...], *, revision, cache_dir, local_files_only, token,
            shown) -> Path:
    import huggingface_hub as hub

    path = _fetch(lambda: hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                                local_files_only=bool(local_files_only), token=token,
                                                allow_patterns=list(patterns)),
                  repo_id, "the model folder", revision=revision, local_files_only=local_files_only, shown=shown)
    if not (path / "config.json").is_file():
        raise HubError(f"{repo_id}: the snapshot has no config.json (not a BitDance model folder)")
    return path


def download(name: str, *, local_dir: str | os.PathLike | None = None, **kw) -> Resolved:
    """:func:`resolve` (into the hub cache), then, with ``local_dir``, plain copies of the files there (what
    ``bitdance download --dir`` does: a folder to move to another machine; it works offline from the cache
    too). Files already in ``local_dir`` with the same size are kept; each copy is written aside and renamed."""
    found = resolve(name, **kw)
    if local_dir is None:
        return found
    dest = Path(local_dir)
    dest.mkdir(parents=True, exist_ok=True)

    def place(src: Path, rel: Path) -> Path:
        target = dest / rel
        if not (target.is_file() and target.stat().st_size == src.stat().st_size):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        return target

    if found.path.is_dir():
        for f in sorted(found.path.rglob("*")):
            if f.is_file():
                place(f, f.relative_to(found.path))
        return Resolved(dest, release=found.release)
    path = place(found.path, Path(found.path.name))
    tok = place(found.tokenizer, Path(found.tokenizer.name)) if found.tokenizer is not None else None
    if found.release is not None:  # a released tokenizer's config beside its weights
        for extra in found.release.files[1:]:
            place(found.path.with_name(extra), Path(extra))
    return Resolved(path, tokenizer=tok, release=found.release)
