"""Minimal safetensors reader/writer on numpy, with bfloat16 (via ml_dtypes) and
memory-mapped lazy reads.

The format: 8-byte little-endian header length, a JSON header mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the
header) plus an optional ``__metadata__`` dict of strings, then the raw bytes.
We read it ourselves because the ``safetensors`` numpy backend has no bfloat16 and
because the supernet store wants memory-mapped views.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file is truncated, corrupt or holds an unsupported dtype."""


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Parse the header of ``path`` -> (tensor entries incl. ``__metadata__``, data offset)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: file is {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise SafetensorsError(f"{path}: header claims {n} bytes but file has {size - 8}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise SafetensorsError(
            f"{path}: truncated: tensors need {8 + n + end} bytes, file has {size}"
        )
    return header, 8 + n


def read_safetensors(
    path: str | os.PathLike, names: Iterable[str] | None = None, *, mmap: bool = True
) -> dict[str, np.ndarray]:
    """Tensors of ``path`` as numpy arrays (read-only memory-mapped views by default)."""
    header, offset = read_header(path)
    wanted = [k for k in header if k != "__metadata__"] if names is None else list(names)
    buf = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, np.uint8)
    out = {}
    for name in wanted:
        if name not in header:
            raise KeyError(f"{path}: no tensor named {name!r}")
        e = header[name]
        if e["dtype"] not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        b, end = e["data_offsets"]
        dt = DTYPES[e["dtype"]]
        expected = int(np.prod(e["shape"], dtype=np.int64)) * dt.itemsize
        if end - b != expected:
            raise SafetensorsError(
                f"{path}: tensor {name!r} spans {end - b} bytes, "
                f"shape {e['shape']} needs {expected}"
            )
        out[name] = buf[offset + b : offset + end].view(dt).reshape(e["shape"])
    return out


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` atomically (temporary file in the same directory, fsync, rename)."""
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    pos = 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(np.asarray(arr))
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [pos, pos + arr.nbytes],
        }
        pos += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for arr in arrays:
                f.write(arr.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
