"""Durable, all-or-nothing file writes shared by the store writer and the streaming layouts
(store/bundles.py): build in a temporary folder beside the target, then rename it into place."""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from typing import Any

from activeflow_jax.errors import StoreError


def write_error(target: str, exc: BaseException) -> StoreError:
    """A failed file write (read-only or full file system, no permission) in words: nothing was
    written (the temporary folder is removed by the caller), and what to do."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "no space" in text.lower() or "RESOURCE_EXHAUSTED" in text:
        why = "the file system is full"
    elif code == errno.EROFS or "read-only file system" in text.lower():
        why = "the file system is read-only"
    elif code in (errno.EACCES, errno.EPERM) or "permission denied" in text.lower():
        why = "permission was denied"
    else:
        why = f"a file could not be written ({text})"
    return StoreError(f"cannot write {target}: {why}; nothing was written there. Free some space or choose a "
                      "writable folder with room for it, then run the command again")


def new_temporary_dir(final: str) -> str:
    """A fresh hidden path beside `final` to build it in (`.<name>.tmp-<pid>-<random>`), after
    removing what interrupted writes of the same name left (unless their process still runs)."""
    parent, base = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent, base)
    return os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def replace_dir(tmp: str, final: str) -> None:
    """Moves the complete directory `tmp` to `final`; an old `final` is renamed away first and
    deleted last, so `final` is at every moment either the old or the new one, never half of each."""
    if os.path.exists(final):
        parent, base = os.path.split(final)
        trash = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def write_json_durably(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale_temporaries(parent: str, base: str) -> None:
    for entry in os.listdir(parent):
        if entry.startswith(f".{base}.tmp-") or entry.startswith(f".{base}.old-"):
            pid = entry.split("-")[1] if ".tmp-" in entry else None
            if pid and pid.isdigit() and _pid_alive(int(pid)):
                continue  # another process is converting right now
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
