"""Honest flash measurements: drop a store's pages from the page cache, and count the bytes the
process really read from the block device (`read_bytes` of /proc/self/io), next to the bytes it
asked for. A run whose reads were served from DRAM must be labelled warm (DESIGN.md section 5)."""

from __future__ import annotations

import os

from activeflow_jax.errors import InvalidArgumentError


def process_read_bytes() -> int | None:
    """Bytes this process caused to be fetched from storage so far (Linux), None elsewhere."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def files_under(path: str | os.PathLike) -> list[str]:
    """`path` itself if it is a file, else every file below it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InvalidArgumentError(f"cannot drop the page cache of {path}: it does not exist")
    if os.path.isfile(path):
        return [path]
    return [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]


def drop_page_cache(path: str | os.PathLike) -> dict[str, int]:
    """Asks the kernel to evict every file under `path` from the page cache
    (posix_fadvise(POSIX_FADV_DONTNEED)), so the next reads come from the device. Dirty pages are
    written first (fdatasync), otherwise they could not be dropped. Returns files and bytes
    advised. Not available on macOS (no posix_fadvise): raises InvalidArgumentError there."""
    return drop_files(files_under(path))


def drop_files(paths: list[str], *, sync: bool = True) -> dict[str, int]:
    """drop_page_cache of these files. sync=False skips the fdatasync: for files known to be clean
    (read-only while in use, and dropped once with sync before), where it is most of the cost
    (the default model's 271 layout files: 17 ms with it, under 1 ms without, plus 5 ms of
    directory walk that a caller holding the list saves too)."""
    if not hasattr(os, "posix_fadvise"):
        raise InvalidArgumentError("posix_fadvise is not available on this OS; cold runs need O_DIRECT reads here")
    files = nbytes = 0
    for file_path in paths:
        try:
            fd = os.open(file_path, os.O_RDONLY)
        except OSError:
            continue  # vanished or unreadable: nothing of it to evict
        try:
            if sync:
                try:
                    os.fdatasync(fd)
                except OSError:
                    pass
            size = os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            files += 1
            nbytes += size
        finally:
            os.close(fd)
    return {"files": files, "bytes": nbytes}
