"""`GGUFFile`: a GGUF file's header, read the quick way, with the part of `gguf.GGUFReader`'s
interface the loader uses (``fields[key].contents()``; ``tensors`` with ``name``, ``shape``,
``tensor_type``, ``n_elements``, ``n_bytes`` and ``data``, a memory-mapped array shaped as the
`gguf` package shapes it).

Why: `gguf.GGUFReader` builds numpy views for every piece of every metadata value; the embedded
model's 49k-token vocabulary and merges make that 2.5-3.5 s of its ~3.5 s load. Here scalars are
unpacked with `struct`, numeric arrays are one `np.frombuffer` view, and string arrays are only
measured (their strings are decoded when `contents()` asks). A big-endian file, or a GGUF version
other than 2 and 3, is left to `gguf.GGUFReader` (`open_gguf` falls back). Every tensor's bytes are
checked to lie inside the file. This module does not dequantize (`lagoon.engine.checkpoint`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFFile", "GGUFField", "GGUFTensor", "NotQuickReadable"]

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_FLOAT_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                "I32": np.int32, "I64": np.int64}


class NotQuickReadable(Exception):
    """A valid-looking file this reader leaves to `gguf.GGUFReader` (big-endian, another version)."""


@dataclass
class GGUFField:
    name: str
    _value: Any = None  # a scalar, a str, an np.ndarray (numeric array) or _Strings

    def contents(self) -> Any:
        v = self._value
        if isinstance(v, _Strings):
            return v.decode()
        if isinstance(v, np.ndarray):
            return v.tolist()
        return v


@dataclass
class _Strings:
    buf: Any
    offsets: list[tuple[int, int]]

    def decode(self) -> list[str]:
        return [str(self.buf[a:b], encoding="utf-8") for a, b in self.offsets]


@dataclass
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # GGUF order (innermost first), as gguf's reader gives it
    n_elements: int
    n_bytes: int
    data: np.ndarray


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(self._map)  # type: ignore[arg-type]
        self._buf, self._pos = buf, 0
        try:
            if bytes(buf[:4]) != b"GGUF":
                raise ValueError("no GGUF magic at the start")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
            if version not in (2, 3):
                raise NotQuickReadable(f"GGUF version {version} (or a big-endian file)")
            self._pos = 24
            self.fields: dict[str, GGUFField] = {  # the pseudo-fields gguf's reader adds too
                k: GGUFField(k, v) for k, v in (("GGUF.version", version), ("GGUF.tensor_count", n_tensors),
                                                ("GGUF.kv_count", n_kv))}
            for _ in range(n_kv):
                key = self._string()
                (vtype,) = self._unpack("<I")
                self.fields[key] = GGUFField(key, self._value(vtype))
            infos = []
            for _ in range(n_tensors):
                name = self._string()
                (n_dims,) = self._unpack("<I")
                dims = self._unpack(f"<{n_dims}Q")
                kind, offset = self._unpack("<IQ")
                infos.append((name, dims, kind, offset))
        except struct.error as exc:
            raise ValueError(f"the header is cut off ({exc})") from exc
        align = int(self.fields["general.alignment"].contents()) if "general.alignment" in self.fields else 32
        start = -(-self._pos // align) * align
        self.tensors: list[GGUFTensor] = []
        names: set[str] = set()
        for name, dims, kind, offset in infos:
            if name in names:
                raise ValueError(f"tensor {name!r} appears twice")
            names.add(name)
            qtype = GGMLQuantizationType(kind)
            block, size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims, dtype=np.int64)) if dims else 1
            n_bytes = n * size // block
            begin = start + offset
            if begin + n_bytes > len(self._map):
                raise ValueError(f"tensor {name!r} needs bytes up to {begin + n_bytes}, the file has {len(self._map)}")
            np_dims = tuple(reversed(dims))
            dtype = _FLOAT_NUMPY.get(qtype.name)
            if dtype is None:  # quantized: [rows, bytes a row] uint8, as gguf's reader gives it
                data = self._map[begin:begin + n_bytes].reshape(quant_shape_to_byte_shape(np_dims, qtype))
            else:
                data = self._map[begin:begin + n_bytes].view(dtype).reshape(np_dims)
            self.tensors.append(GGUFTensor(name, qtype, np.array(dims, dtype=np.uint64), n, n_bytes, data))

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        out = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        s = str(self._buf[self._pos:self._pos + n], encoding="utf-8")
        if len(self._buf) < self._pos + n:
            raise struct.error("a string runs past the end")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])[0]
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = self._unpack("<IQ")
        if etype in _NUMPY:
            width = np.dtype(_NUMPY[etype]).itemsize
            if self._pos + count * width > len(self._buf):
                raise struct.error("an array runs past the end")
            arr = np.frombuffer(self._buf, dtype=_NUMPY[etype], count=count, offset=self._pos)
            self._pos += count * width
            return arr
        if etype == _STRING:  # measured now, decoded on demand
            offsets, pos, buf = [], self._pos, self._buf
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(count):
                (n,) = unpack(buf, pos)
                offsets.append((pos + 8, pos + 8 + n))
                pos += 8 + n
            if pos > len(buf):
                raise struct.error("a string array runs past the end")
            self._pos = pos
            return _Strings(buf, offsets)
        return [self._value(etype) for _ in range(count)]  # arrays of arrays: rare, small
