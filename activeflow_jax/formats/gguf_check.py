"""A bounds-checked walk over a GGUF file's header before the `gguf` package parses it.

`gguf.GGUFReader` trusts the counts in the file: a damaged array length (one flipped bit in a
token list's count) makes it parse element after element for hours, and a damaged tensor shape
makes it map more bytes than the file has. This walk reads the same structure (header, metadata
key/values, tensor infos) but checks every count and length against the bytes left in the file
first, so a damaged file is refused in milliseconds with the offset of the damage
(found by bench/fuzz.py).
"""

from __future__ import annotations

import functools
import mmap
import os
import struct

from activeflow_jax.errors import GGUFError, UnsupportedModelError

# GGUF metadata value types: byte size of the scalar ones
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4


class _Walk:
    def __init__(self, data, path: str):
        self.data, self.pos, self.size, self.path = data, 0, len(data), path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: the GGUF header is damaged ({what} at byte {self.pos}); the file is "
                         "truncated or corrupted: download it again")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{n} bytes wanted, {self.size - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> None:
        self.take(self.u64())

    def count(self, n: int, min_bytes: int, what: str) -> int:
        if n * min_bytes > self.size - self.pos:
            raise self.fail(f"{what} count {n} cannot fit in the {self.size - self.pos} bytes left")
        return n

    def value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[vtype])
        elif vtype == _STRING:
            self.string()
        elif vtype == _ARRAY and depth < 2:
            itype, n = self.u32(), self.u64()
            if itype in _SCALAR_SIZES:
                self.take(self.count(n, _SCALAR_SIZES[itype], "array") * _SCALAR_SIZES[itype])
            elif itype in (_STRING, _ARRAY):
                for _ in range(self.count(n, 8 if itype == _STRING else 12, "array")):
                    self.value(itype, depth + 1)
            else:
                raise self.fail(f"unknown array element type {itype}")
        else:
            raise self.fail(f"unknown value type {vtype}")


@functools.lru_cache(maxsize=1)
def supported_tensor_types() -> tuple[str, ...]:
    """Names of GGML tensor types we can dequantize (whatever the gguf package implements)."""
    import gguf  # imported lazily: the package is only needed for conversion
    import numpy as np

    names = ["F32", "F16", "BF16"]
    for qtype in gguf.GGMLQuantizationType:
        if qtype.name in names:
            continue
        try:
            gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except Exception:
            continue
        names.append(qtype.name)
    return tuple(names)


def check_gguf_structure(path: str | os.PathLike) -> None:
    """Raises GGUFError if the header, metadata or tensor infos of the GGUF at `path` do not fit
    the file (counts, lengths, types, tensor shapes and offsets)."""
    import gguf
    import numpy as np

    path = os.fspath(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise GGUFError(f"{path}: only {os.fstat(f.fileno()).st_size} bytes, too short for a GGUF header; the "
                            "file is truncated: download it again")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            walk = _Walk(data, path)
            walk.take(4)  # magic, checked by the caller
            version = walk.u32()
            if version not in (2, 3):
                raise walk.fail(f"GGUF version {version}, expected 2 or 3")
            n_tensors, n_kv = walk.u64(), walk.u64()
            walk.count(n_tensors, 8 + 4 + 8 + 4 + 8, "tensor")
            for _ in range(walk.count(n_kv, 8 + 4, "metadata key")):
                walk.string()
                walk.value(walk.u32())
            extents = []
            for _ in range(n_tensors):
                name = walk.take(walk.u64())
                n_dims = walk.u32()
                if not 1 <= n_dims <= _MAX_DIMS:
                    raise walk.fail(f"a tensor with {n_dims} dimensions")
                dims = [walk.u64() for _ in range(n_dims)]
                ttype, offset = walk.u32(), walk.u64()
                try:
                    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
                except (ValueError, KeyError):
                    # a well-formed header with a type id newer than the gguf package: not damage
                    raise UnsupportedModelError(
                        f"{path}: tensor '{name.decode('utf-8', 'replace')}' is of type {ttype}, a type this gguf "
                        f"package does not know; supported types: {', '.join(supported_tensor_types())}. Upgrade "
                        "the gguf package, or re-quantize the model (e.g. llama-quantize ... Q8_0)") from None
                elements = int(np.prod(dims, dtype=object))
                if elements == 0 or elements % block:
                    raise walk.fail(f"a tensor of shape {dims} and type {ttype}")
                extents.append((offset, elements // block * type_size, dims))
            data_bytes = walk.size - walk.pos  # the data section starts at or after here
            for offset, nbytes, dims in extents:
                if offset + nbytes > data_bytes:
                    raise walk.fail(f"a tensor of shape {dims} at data offset {offset} ({nbytes} bytes) reaches past "
                                    f"the end of the file")
