"""Reading a GGUF file's header: its scalar metadata and its tensor table, with each tensor's
raw bytes as a view into the memory-mapped file. No torch: model_files reads config facts here
before any worker starts.

GGUFTensors reads a file's scalar metadata and tensor table without parsing its big arrays:
gguf.GGUFReader builds a numpy view for every element of every metadata array, which for a
49k-token vocabulary plus merges alone takes about 5 s. Loading weights needs only the scalars
and the tensor table, so this reader steps over arrays by their lengths and maps the tensor
data. The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]   # numpy order (rows, ..., columns); GGUF lists dims the other way
    data: np.ndarray         # raw bytes [rows..., bytes per row], a view into the mapped file


class GGUFTensors:
    def __init__(self, path: str):
        from gguf import GGMLQuantizationType   # the gguf package: only for GGUF models

        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self._map, dtype=np.uint8)
        self._buf = memoryview(self.data)
        self.metadata: dict[str, object] = {}   # scalar and string fields only
        self._pos = 0
        magic, version = self._unpack("<4sI")
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (big-endian or v1?)")
        tensor_count, kv_count = self._unpack("<QQ")
        for _ in range(kv_count):
            key = self._string()
            (value_type,) = self._unpack("<I")
            value = self._value(value_type)
            if value is not None:
                self.metadata[key] = value
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            tensor_type, offset = self._unpack("<IQ")
            infos.append((name, dims, GGMLQuantizationType(tensor_type), offset))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(start, *info) for info in infos]

    def release(self, tensor: GGUFTensor) -> None:
        """Drop the tensor's whole pages from this process's memory (clean file pages: a later
        read faults them in from the file again), once its bytes have been copied."""
        begin = tensor.data.__array_interface__["data"][0] - self.data.__array_interface__["data"][0]
        first = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (begin + tensor.data.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        text = bytes(self._buf[self._pos:self._pos + length]).decode("utf-8", errors="replace")
        self._pos += length
        return text

    def _value(self, value_type: int):
        if value_type in _SCALARS:
            return self._unpack(_SCALARS[value_type])[0]
        if value_type == _STRING:
            return self._string()
        if value_type != _ARRAY:
            raise ValueError(f"unknown GGUF value type {value_type}")
        item_type, count = self._unpack("<IQ")
        if item_type in _SCALARS:
            self._pos += count * struct.calcsize(_SCALARS[item_type])
        else:  # strings (or nested arrays): walk them by their lengths
            for _ in range(count):
                self._value(item_type)
        return None

    def _tensor(self, data_start: int, name: str, dims: tuple[int, ...], tensor_type, offset: int):
        from gguf import GGML_QUANT_SIZES

        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        row_bytes = dims[0] // block_size * type_size
        rows = int(np.prod(dims[1:], dtype=np.int64))
        begin = data_start + offset
        raw = self.data[begin:begin + rows * row_bytes]
        shape = tuple(int(d) for d in reversed(dims))
        return GGUFTensor(name, tensor_type, shape, raw.reshape(*shape[:-1], row_bytes))
