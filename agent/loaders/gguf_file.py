"""A fast GGUF reader: metadata as plain Python values, tensors as memory-mapped views.

`gguf.GGUFReader` builds numpy views for every metadata item (a 49k-entry vocabulary takes
seconds); this parser reads the header once with `struct` and maps only the tensors asked for.
Format: magic "GGUF", version, tensor count, KV count, KV pairs, tensor infos, aligned data.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import numpy as np

# GGUF metadata value types.
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (rows last dim first is GGUF's; reversed here)
    ggml_type: int
    offset_bytes: int  # absolute offset in the file


# What to do about a tensor that cannot be read, by why.
CONVERT = ("convert the model with llama.cpp's llama-quantize to a supported type "
           "(F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, ...)")
UPGRADE_GGUF = "upgrade the gguf package (pip install -U gguf), which may know it"
DOWNLOAD_AGAIN = "download the file again"


@cache
def undequantizable(ggml_type: int) -> tuple[str, str] | None:
    """Why a tensor of GGML type `ggml_type` cannot be read, and what to do (None: it can): the
    installed gguf package does not know the type, or cannot dequantize it (probed on one zero
    block)."""
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
    except ValueError:
        return f"type {ggml_type}, which the gguf package does not know", UPGRADE_GGUF
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return f"type {qtype.name}, which the gguf package cannot dequantize", CONVERT
    return None


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array left unread (`with_arrays=False`); only its length is known."""

    count: int

    def __len__(self) -> int:
        return self.count


class GGUFFile:
    def __init__(self, path: Path | str, with_arrays: bool = True):
        """Parses the header. `with_arrays=False` skips array values (the vocabulary and merges,
        ~100k strings) for readers that need only the shapes and tensors."""
        self.path = Path(path)
        self.with_arrays = with_arrays
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            self._buf = buf
            self._pos = 0
            try:
                self._parse()
            finally:
                del self._buf

    def _read(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _read_str(self) -> str:
        n = self._read("<Q")
        s = self._buf[self._pos : self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _read_value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._read_str()
        if vtype == _ARRAY:
            item_type = self._read("<I")
            count = self._read("<Q")
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type])
                values = None
                if self.with_arrays:
                    values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos).tolist()
                self._pos += dtype.itemsize * count
                return values if self.with_arrays else SkippedArray(count)
            if not self.with_arrays and item_type == _STRING:
                for _ in range(count):
                    length = self._read("<Q")
                    self._pos += length
                return SkippedArray(count)
            return [self._read_value(item_type) for _ in range(count)]
        return self._read(_SCALARS[vtype])

    def _parse(self) -> None:
        if self._buf[:4] != b"GGUF":
            raise ValueError(f"{self.path.name} is not a GGUF file")
        self._pos = 4
        version = self._read("<I")
        if version < 2:
            raise ValueError(f"{self.path.name}: GGUF version {version} is too old")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        for _ in range(n_kv):
            key = self._read_str()
            self.metadata[key] = self._read_value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._read_str()
            n_dims = self._read("<I")
            dims = [self._read("<Q") for _ in range(n_dims)]
            ggml_type, offset = self._read("<I"), self._read("<Q")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        for name, shape, ggml_type, offset in infos:
            self.tensors[name] = TensorInfo(name, shape, ggml_type, data_start + offset)

    def unreadable(self, name: str) -> tuple[str, str] | None:
        """Why tensor `name` cannot be dequantized from this file, and what to do (None: it
        can): a type the gguf package cannot dequantize, rows that are not whole blocks of its
        type, or data past the end of the file (a truncated download)."""
        import gguf

        info = self.tensors[name]
        refused = undequantizable(info.ggml_type)
        if refused is not None:
            return f"it is stored as {refused[0]}", refused[1]
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        row_elems = info.shape[-1] if info.shape else 1
        if row_elems % block_size:
            return f"its rows of {row_elems} values are not whole {qtype.name} blocks of {block_size}", CONVERT
        n_bytes = math.prod(info.shape) // block_size * type_size
        if info.offset_bytes + n_bytes > self._file_size:
            return "its data runs past the end of the file (an incomplete download?)", DOWNLOAD_AGAIN
        return None

    @cached_property
    def _file_size(self) -> int:
        return self.path.stat().st_size

    @cached_property
    def _mmap(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.uint8, mode="r")

    def raw(self, name: str) -> np.ndarray:
        """Returns the tensor's bytes as stored, shaped (rows, bytes per row)."""
        import gguf

        info = self.tensors[name]
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.ggml_type)]
        row_elems = info.shape[-1]
        n_rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        row_bytes = row_elems // block_size * type_size
        return self._mmap[info.offset_bytes : info.offset_bytes + n_rows * row_bytes].reshape(n_rows, row_bytes)

    def dequantize(self, name: str) -> np.ndarray:
        """Returns the tensor as float32 in numpy order (out, in)."""
        import gguf

        info = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        out = gguf.quants.dequantize(self.raw(name), qtype)
        return np.asarray(out, dtype=np.float32).reshape(info.shape)
