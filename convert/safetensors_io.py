"""Reading (sharded) safetensors checkpoints one block of rows at a time.

`safetensors.safe_open(framework="np")` cannot return bfloat16 and hands out whole
tensors; this reader parses the header itself, reads a tensor's bytes in blocks of rows
with plain file reads and views them through ml_dtypes. Plain reads (not a memory map)
keep the source's pages in the OS page cache instead of this process's RSS, so a
converter holds one block of the source at a time whatever the tensor or checkpoint
size. A truncated or corrupt file is reported before any tensor is used.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from models.checkpoint import CheckpointError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsFile:
    """One .safetensors file: header parsed and validated; tensors read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file ({size} bytes, no header)"
                )
            (header_len,) = struct.unpack("<Q", raw)
            if 8 + header_len > size:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file (header says {header_len} bytes)"
                )
            try:
                header = json.loads(f.read(header_len))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated safetensors file: tensors need {self._data_start + end} bytes, "
                f"file has {size}"
            )
        for name, entry in header.items():
            if entry["dtype"] not in _DTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}"
                )

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def row_blocks(self, name: str, block_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) blocks of one tensor along its first axis, each about
        `block_bytes` (at least one row); a 0-d tensor comes as one block."""
        entry = self._entries[name]
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        if int(np.prod(shape)) == 0 or not shape:
            begin, end = entry["data_offsets"]
            with open(self.path, "rb") as f:
                f.seek(self._data_start + begin)
                yield 0, np.frombuffer(f.read(end - begin), dtype).reshape(shape)
            return
        row_bytes = dtype.itemsize * int(np.prod(shape[1:]))
        per_block = max(1, block_bytes // row_bytes)
        begin = self._data_start + entry["data_offsets"][0]
        with open(self.path, "rb") as f:
            for start in range(0, shape[0], per_block):
                rows = min(per_block, shape[0] - start)
                f.seek(begin + start * row_bytes)
                yield (
                    start,
                    np.frombuffer(f.read(rows * row_bytes), dtype).reshape((rows, *shape[1:])),
                )


class SafetensorsCheckpoint:
    """All tensors of a HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        index = directory / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            shard_names = sorted(set(weight_map.values()))
            missing = [n for n in shard_names if not (directory / n).exists()]
            if missing:
                raise CheckpointError(
                    f"{directory}: shards listed in {INDEX_NAME} are missing: {missing}"
                )
            shards = {n: SafetensorsFile(directory / n) for n in shard_names}
            self._where = {key: shards[shard] for key, shard in weight_map.items()}
            for key, shard in weight_map.items():
                if key not in shards[shard]._entries:
                    raise CheckpointError(
                        f"{directory / shard}: tensor {key!r} listed in the index is absent"
                    )
        elif (directory / SINGLE_NAME).exists():
            single = SafetensorsFile(directory / SINGLE_NAME)
            self._where = {key: single for key in single.keys()}
        else:
            found = sorted(p.name for p in directory.glob("*.safetensors"))
            raise CheckpointError(
                f"{directory}: no weights found: expected {SINGLE_NAME} or {INDEX_NAME}"
                + (f" (found {found})" if found else "")
            )

    def keys(self) -> list[str]:
        return sorted(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def row_blocks(self, key: str, block_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
        return self._where[key].row_blocks(key, block_bytes)
