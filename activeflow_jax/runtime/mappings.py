"""Headroom under the kernel's limit on memory mappings, checked before compiling more programs.

XLA:CPU keeps each compiled program's machine code in mappings of its own (measured: ~3.7 per
small jitted function, ~160 per budget-runtime program), and JAX's caches keep every program of
the process alive. Linux caps the mappings of one process (`vm.max_map_count`, 65,530 by
default); reaching it makes the next mmap inside XLA's compiler fail, and XLA crashes the
interpreter (a segfault, no Python error). One budget engine of the default model compiles ~27
programs (+4,388 mappings); an all-in-DRAM sparse engine +451. So a long-lived process that loads
many engines with different plans would crash; this module turns that into a clear error, after
first trying to free programs nobody holds any more.
"""

from __future__ import annotations

import gc
import warnings

import jax

from activeflow_jax.errors import MappingLimitError

# what loading an engine may add: measured figures above, with room for longer sequences' buckets
BUDGET_ENGINE_MAPPINGS = 6_000
ENGINE_MAPPINGS = 1_000

_MAPS = "/proc/self/maps"
_LIMIT = "/proc/sys/vm/max_map_count"


def mapping_count() -> int | None:
    """Memory mappings of this process now; None where /proc is not there (macOS)."""
    try:
        with open(_MAPS, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def mapping_limit() -> int | None:
    """The kernel's per-process limit (vm.max_map_count); None where it cannot be read."""
    try:
        with open(_LIMIT) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def ensure_headroom(needed: int, what: str) -> None:
    """Raises MappingLimitError unless `needed` more mappings fit under the limit. Near the limit
    it first drops JAX's cached programs (programs an engine still holds stay; the others compile
    again when next used) and warns that it did."""
    limit = mapping_limit()
    count = mapping_count()
    if limit is None or count is None or limit - count >= needed:
        return
    warnings.warn(f"this process holds {count:,} memory mappings, near the kernel's limit vm.max_map_count="
                  f"{limit:,}; dropping JAX's cached compiled programs to make room (they compile again when "
                  "next used)", RuntimeWarning, stacklevel=3)
    jax.clear_caches()
    gc.collect()
    count = mapping_count() or 0
    if limit - count >= needed:
        return
    raise MappingLimitError(
        f"{what} needs about {needed:,} more memory mappings for its compiled programs, but this process "
        f"holds {count:,} of the {limit:,} the kernel allows (vm.max_map_count), even after dropping JAX's "
        "cached programs; going on would crash the interpreter inside XLA. Drop engines you no longer use "
        "(engine.close(); del engine: their programs go with them), or raise the limit: "
        "sudo sysctl -w vm.max_map_count=262144")
