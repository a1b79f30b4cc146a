"""How many bytes of weights a model folder holds, without loading a tensor.

A safetensors file starts with an 8-byte little-endian header length and a JSON header that gives each
tensor's dtype, shape and byte range: reading it costs one small read per file, also for a 100 GB model,
and checks the file is whole (a truncated download is a broken model, found here rather than by the
engine minutes into loading). Other weight formats (``pytorch_model*.bin``, ``*.pt``) count by file size.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from engines.discovery.classify import Unsupported, read_json

# Bits per element of the safetensors dtypes; packed or new types fall back to the header's byte range.
DTYPE_BITS: dict[str, int] = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U64": 64,
    "U32": 32,
    "U16": 16,
    "U8": 8,
    "BOOL": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F4": 4,
}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Weights:
    files: tuple[str, ...]
    bytes: int
    dtypes: tuple[str, ...]  # safetensors dtypes, most bytes first ("" when not safetensors)


def safetensors_tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes per dtype in one safetensors file, from its header; ``Unsupported`` when the file is broken."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise Unsupported(f"{path.name} is too short to be safetensors")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or 8 + length > size:
                raise Unsupported(f"{path.name}: header length {length} does not fit the file ({size} bytes)")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise Unsupported(f"{path.name} cannot be read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unsupported(f"{path.name}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise Unsupported(f"{path.name}: the safetensors header is not a JSON object")
    data = size - 8 - length
    per_dtype: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise Unsupported(f"{path.name}: tensor {name!r} has no dtype, shape or data_offsets") from None
        if not 0 <= start <= end <= data:
            raise Unsupported(f"{path.name}: tensor {name!r} lies outside the file (truncated download?)")
        bits = DTYPE_BITS.get(str(dtype))
        if bits is not None and isinstance(shape, list):
            expected = math.ceil(math.prod(int(d) for d in shape) * bits / 8)
            if expected != end - start:
                raise Unsupported(
                    f"{path.name}: tensor {name!r} is {end - start} bytes, its shape and dtype say {expected}"
                )
        per_dtype[str(dtype)] = per_dtype.get(str(dtype), 0) + end - start
    return per_dtype


def _safetensors_files(folder: Path) -> list[Path]:
    """The shards the index names (repos may also carry a consolidated copy that must not count twice)."""
    index = folder / INDEX
    if index.is_file():
        value = read_json(index)
        weight_map = value.get("weight_map") if isinstance(value, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise Unsupported(f"{INDEX} has no weight_map")
        names = sorted({str(v) for v in weight_map.values()})
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise Unsupported(
                f"{INDEX} lists shards that are missing: {', '.join(missing[:3])}"
                + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            )
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def read_weights(folder: Path) -> Weights:
    """The folder's weights; ``Unsupported`` when there are none or a file is broken."""
    files = _safetensors_files(folder)
    if files:
        per_dtype: dict[str, int] = {}
        for file in files:
            for dtype, count in safetensors_tensor_bytes(file).items():
                per_dtype[dtype] = per_dtype.get(dtype, 0) + count
        total = sum(per_dtype.values())
        if total == 0:
            raise Unsupported("the safetensors files hold no tensors")
        order = tuple(sorted(per_dtype, key=lambda d: -per_dtype[d]))
        return Weights(tuple(f.name for f in files), total, order)
    others = sorted([*folder.glob("pytorch_model*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")])
    if others:
        return Weights(tuple(f.name for f in others), sum(f.stat().st_size for f in others), ())
    raise Unsupported("no weight files (*.safetensors, pytorch_model*.bin)")
