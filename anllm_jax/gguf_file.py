"""GGUF files: a direct parse of the header (metadata and tensor directory, v2/v3, little-endian) and the
dequantization of one tensor (with the `gguf` package's quantization tables).

`gguf.GGUFReader` builds a numpy view per string, which takes seconds for a 50k-entry vocabulary; the header is
small enough to read directly.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any, NamedTuple

import numpy as np

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class Tensor(NamedTuple):
    qtype: int
    shape: tuple[int, ...]  # numpy order (GGUF dims reversed): [out, in] for matrices
    offset: int  # absolute byte offset in the file
    n_bytes: int


def read(path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Metadata and tensor directory of a GGUF v2/v3 file (little-endian)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(buf):
            raise ValueError("header runs past the end of the file")
        s = buf[pos : pos + n].decode("utf-8", errors="replace")
        pos += n
        return s

    def value(vtype: int) -> Any:
        nonlocal pos
        if vtype == STRING:
            return string()
        if vtype == ARRAY:
            itype, n = take("<I"), take("<Q")
            if itype == STRING:
                return [string() for _ in range(n)]
            if itype == ARRAY:
                return [value(ARRAY) for _ in range(n)]
            dt = np.dtype(SCALARS[itype])
            arr = np.frombuffer(buf, dt, count=n, offset=pos)
            pos += n * dt.itemsize
            return arr.tolist()
        return take(SCALARS[vtype])

    if buf[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    version = take("<4xI")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3, little-endian)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, dims, take("<I"), take("<Q")))
    align = int(meta.get("general.alignment", 32))
    data_start = -(-pos // align) * align
    tensors = {}
    for name, dims, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        n_bytes = int(np.prod(dims)) // block * type_size
        tensors[name] = Tensor(qtype, tuple(reversed(dims)), data_start + offset, n_bytes)
    return meta, tensors


def dequantized(data: np.ndarray, t: Tensor) -> np.ndarray:
    """Tensor `t` of the file's bytes `data` (a uint8 memmap) as float32, in numpy order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quant_shape_to_byte_shape

    qtype = GGMLQuantizationType(t.qtype)
    raw = np.asarray(data[t.offset : t.offset + t.n_bytes]).reshape(quant_shape_to_byte_shape(t.shape, qtype))
    return dequantize(raw, qtype)
