"""Files written so that nothing already on disk is lost: atomic replacement through a temporary sibling,
and the removal of the siblings an interrupted write left behind."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["temp_sibling_prefix", "remove_stale_temps", "atomic_write", "save_safetensors", "current_umask"]


def temp_sibling_prefix(path: str | os.PathLike) -> str:
    """Name prefix of the temporary siblings of ``path`` this process writes (``.NAME.tmp-PID-``): the pid
    lets the next writer tell an interrupted write (its process gone) from one still running."""
    return f".{Path(path).name}.tmp-{os.getpid()}-"


_STALE = re.compile(r"\.(?P<name>.+)\.(?:tmp-(?P<pid>\d+)-.*|old-(?P<old>\d+))$")
_LEGACY_STALE_S = 3600.0  # temp names without a pid (written before 0.x): stale once this old


def remove_stale_temps(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete what interrupted writes left in ``directory`` (of ``name`` only, if given): temporary files
    and folders whose writing process is gone, and ``.NAME.old-PID`` folders of an interrupted swap.
    Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        m = _STALE.match(entry.name)
        legacy = False
        if m is None:  # older releases: ``.NAME.XXXXXXXX`` (mkdtemp) and ``.NAME.XXXXXXXX.tmp`` (mkstemp)
            if name is None or not entry.name.startswith(f".{name}."):
                continue
            rest = entry.name[len(name) + 2:]
            if not re.fullmatch(r"[A-Za-z0-9_]{8}(\.tmp)?", rest):
                continue
            legacy = True
        elif name is not None and m.group("name") != name:
            continue
        try:
            if legacy:
                if time.time() - entry.lstat().st_mtime < _LEGACY_STALE_S:
                    continue
            elif _alive(int(m.group("pid") or m.group("old"))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # another process cleaned it first, or it is not ours to remove
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def atomic_write(path: str | os.PathLike, write_fn) -> None:
    """Write via a temporary file in the same directory and rename, so a crash never leaves a
    half-written file in place of a good one (the temporary files of earlier crashes are removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_sibling_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; keep the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(sd: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))

