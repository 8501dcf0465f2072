"""One ``.safetensors`` file, read and written safely.

Reading checks the header before any tensor byte is read: a pickle or ``torch.save`` file is recognised
by its magic bytes (never unpickled), a truncated or padded file is reported with the bytes expected
and found, and every tensor entry must describe exactly the bytes it covers. Writing is atomic
(temporary file, fsync, rename) and the new file follows the umask like any other file.

Layout (the safetensors specification): an unsigned 64-bit little-endian header length N, N bytes
of JSON object starting with ``{`` (trailing spaces allowed), then the tensor data, each tensor at
``data_offsets`` [begin, end) counted from the end of the header, covering the data without gaps.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

MAX_HEADER = 16 * 2**20   # bytes; a CustomContrast header is a few kB (SDXL: ~200 entries + metadata)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_PICKLE_MAGIC = {b"\x80\x02": "pickle protocol 2", b"\x80\x03": "pickle protocol 3",
                 b"\x80\x04": "pickle protocol 4", b"\x80\x05": "pickle protocol 5"}
_ZIP_MAGIC = b"PK\x03\x04"   # torch.save's default container


class CheckpointError(ValueError):
    """A weight file that is not a valid CustomContrast checkpoint; the message says why."""


@dataclass(frozen=True)
class Entry:
    """One tensor as the header declares it."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: tensor entries by name and the free-form string metadata."""

    entries: Mapping[str, Entry]
    metadata: Mapping[str, str]


def _pickle_kind(head: bytes) -> str | None:
    if head[:4] == _ZIP_MAGIC:
        return "zip archive (torch.save)"
    return _PICKLE_MAGIC.get(head[:2])


def _refuse_pickle(path: Path, kind: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle / torch.save file ({kind}); expected a .safetensors CustomContrast checkpoint. "
        "Pickles are never loaded (they can run code): export with `python -m training.export`."
    )


def _header_length(path: Path, f, size: int) -> int:
    """Reads the 8-byte header length, telling a safetensors file from a pickle by the JSON's ``{``.

    The first byte alone cannot tell them apart: it is the low byte of the header length, 0x80 (pickle's
    PROTO opcode) for every header of 128 + 256 k bytes.
    """
    head = f.read(9)
    (n,) = struct.unpack("<Q", head[:8]) if len(head) >= 8 else (None,)
    if n is not None and n <= MAX_HEADER and head[8:9] == b"{":
        return n
    kind = _pickle_kind(head)
    if kind:
        raise _refuse_pickle(path, kind)
    if n is None:
        raise CheckpointError(f"{path} has {size} bytes; a .safetensors file has at least 8 (its header length)")
    if len(head) == 8:
        raise CheckpointError(f"{path} is truncated: its header length says {n} header bytes follow, found none")
    if n > MAX_HEADER and head[8:9] == b"{":
        raise CheckpointError(f"{path}: header of {n} bytes; a CustomContrast checkpoint's header has at most "
                              f"{MAX_HEADER} bytes")
    raise CheckpointError(
        f"{path} is not a .safetensors file: expected an 8-byte little-endian header length and a JSON header "
        f"starting with '{{', found the bytes {head!r}"
    )


def _entry(path: Path, name: str, value: object) -> Entry:
    ok = (isinstance(value, dict) and value.get("dtype") in DTYPE_BYTES
          and isinstance(value.get("shape"), list)
          and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value["shape"])
          and isinstance(value.get("data_offsets"), list) and len(value["data_offsets"]) == 2
          and all(isinstance(o, int) and not isinstance(o, bool) for o in value["data_offsets"]))
    if not ok:
        raise CheckpointError(
            f"{path} is not a valid .safetensors file: tensor entry {name!r} lacks dtype, shape or data_offsets "
            f"[begin, end] (expected dtype one of {sorted(DTYPE_BYTES)}, shape non-negative integers); "
            f"found {value!r:.300}"
        )
    begin, end = value["data_offsets"]
    entry = Entry(value["dtype"], tuple(value["shape"]), begin, end)
    nbytes = math.prod(entry.shape) * DTYPE_BYTES[entry.dtype]
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(
            f"{path} is not a valid .safetensors file: tensor {name!r} ({entry.dtype}, shape {list(entry.shape)}) "
            f"needs {nbytes} bytes, its data_offsets {[begin, end]} cover {end - begin}"
        )
    return entry


def _check_coverage(path: Path, entries: Mapping[str, Entry], data_start: int, size: int) -> None:
    """The tensors must cover the data exactly: no gap, no overlap, nothing missing or left over."""
    end = max((e.end for e in entries.values()), default=0)
    if data_start + end > size:
        raise CheckpointError(
            f"{path} is truncated (incomplete): expected {data_start + end} bytes as its header declares, "
            f"found {size} (an interrupted copy or save?); re-copy or re-export the file"
        )
    offset = 0
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != offset:
            raise CheckpointError(f"{path} is not a valid .safetensors file: tensor {name!r} starts at data byte "
                                  f"{e.begin}, expected {offset} (the tensors must follow each other without gaps)")
        offset = e.end
    if data_start + end < size:
        raise CheckpointError(
            f"{path} has {size - data_start - end} bytes after its last tensor: expected {data_start + end} "
            f"bytes in all, found {size} (a damaged copy?)"
        )


def read_header(path: str | Path) -> Header:
    """Parses and checks the header without reading tensor data; CheckpointError says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CustomContrast checkpoint at {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        n = _header_length(path, f, size)
        f.seek(8)
        raw = f.read(n)
    if len(raw) < n:
        raise CheckpointError(f"{path} is truncated (incomplete): its header length says {n} header bytes, "
                              f"found {len(raw)}; re-copy or re-export the file")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a .safetensors file: its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a .safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path} is not a valid .safetensors file: __metadata__ must map names to strings, "
                              f"found {metadata!r:.200}")
    entries = {name: _entry(path, name, value) for name, value in header.items()}
    _check_coverage(path, entries, 8 + n, size)
    return Header(entries=entries, metadata=metadata)


def read_tensors(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """Loads every tensor of a checked file; CheckpointError (naming the file) for anything malformed."""
    path = Path(path)
    read_header(path)
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{path} could not be read as .safetensors: {err}") from None


def _header_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and the JSON header for ``tensors`` in the order given, padded to 8 bytes."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"safetensors metadata must map strings to strings, found {dict(metadata)!r:.200}")
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored; expected one of "
                            f"{sorted(str(d) for d in _DTYPE_NAMES)}")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_file(f, head: bytes, tensors: Mapping[str, Tensor]) -> None:
    """Writes the header, then each tensor's bytes in the header's order."""
    f.write(head)
    for tensor in tensors.values():
        f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _fsync_folder(path: Path) -> None:
    """Flushes a folder's entries (the rename) to disk where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, err: Exception) -> OSError:
    """A failed write as an OSError naming the file, the cause and what is left on disk."""
    code = err.errno if isinstance(err, OSError) else None
    text = str(err)
    found = re.search(r"os error (\d+)", text)   # safetensors' own error type wraps the OS error
    if code is None and found:
        code = int(found.group(1))
    reason = {errno.ENOSPC: "the disk is full", getattr(errno, "EDQUOT", -1): "the disk quota is exceeded"}.get(
        code) or (os.strerror(code) if code else "write failed")
    previous = "the previous file is kept" if path.exists() else "no file was written"
    message = f"could not write {path}: {reason} ({type(err).__name__}: {text}); {previous}"
    return OSError(code, message) if code else OSError(message)


def write_atomically(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """Writes a safetensors file under a temporary name, flushes it, then renames it over ``path``.

    A crash or a full disk never leaves a partial file under ``path``: the previous file stays intact and
    the temporary file is removed. The file is created with mode 0o666 less the umask (0o644 under 022).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write a checkpoint to {path}: it is a folder; expected a file path "
                                "ending in .safetensors")
    if sys.byteorder != "little":
        raise OSError("writing .safetensors (little-endian) on a big-endian machine is not supported")
    # widest dtypes first, so every tensor starts at a multiple of its element size (safetensors' order)
    tensors = dict(sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0])))
    head = _header_bytes(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        with open(os.open(tmp, flags, 0o666), "wb") as f:   # 0o666 less the umask, like any new file
            _write_file(f, head, tensors)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:
        raise _write_error(path, err) from err
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_folder(path.parent)
    return path
