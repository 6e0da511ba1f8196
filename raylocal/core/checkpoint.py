"""Atomic, checksummed checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is a nested dict of tensors and plain values. Saving writes a
temporary file in the same directory, fsyncs it, renames it over the target
and fsyncs the directory, so a crash leaves either the old or the new file,
never half of one. A SHA-256 over every tensor's bytes and every plain value
is stored inside; loading recomputes it, so a truncated or corrupted file is
refused with a one-line error instead of silently training on damage.
Nothing is ever unpickled beyond tensors and plain containers.

One format for every checkpoint a run writes: a ``kind`` (a run's, a part's,
a parts phase's result) and the ``format`` of this version. Reading one of
another kind, or of a format this version cannot read, fails in one line.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from raylocal.errors import CheckpointError

CHECKSUM_KEY = "sha256"
FORMAT = 2  # the checkpoint format this version writes
KINDS = ("run", "part", "parts-result")
# Checkpoints written before they carried a kind: the format each kind had then,
# when its layout is this version's (those are read; any other is refused).
UNMARKED_FORMATS = {"run": 1, "parts-result": 1, "part": 2}


def _digest(obj: Any, h: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"D")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L")
        for v in obj:
            _digest(v, h)
    else:
        h.update(repr(obj).encode())


def checksum(payload: dict[str, Any]) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != CHECKSUM_KEY}, h)
    return h.hexdigest()


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file, then fsync and rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def host_copy(obj: Any, copy: bool = False) -> Any:
    """``obj`` with every tensor detached and on the CPU (a fresh copy with
    ``copy``, also of tensors already there), through dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=copy)
    if isinstance(obj, dict):
        return {k: host_copy(v, copy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v, copy) for v in obj)
    return obj


def save_checkpoint(path: str | Path, payload: dict[str, Any], kind: str | None = None) -> None:
    """Write ``payload`` atomically, its tensors as CPU tensors: a checkpoint
    made on a GPU loads on a machine without one. A run's own checkpoints name
    their ``kind`` (see ``KINDS``) and get this version's format."""
    payload = host_copy(dict(payload))
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"unknown checkpoint kind {kind!r}")
        payload.update(kind=kind, format=FORMAT)
    payload[CHECKSUM_KEY] = checksum(payload)
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The checkpoint at ``path``, checked whole; with ``kind``, also that it is
    one of that kind, in a format this version reads."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or foreign files
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(payload, dict) or CHECKSUM_KEY not in payload:
        raise CheckpointError(f"{path}: not a raylocal checkpoint (no checksum)")
    if checksum(payload) != payload[CHECKSUM_KEY]:
        raise CheckpointError(f"{path}: checkpoint is corrupted (checksum mismatch)")
    if kind is not None:
        check_kind(path, payload, kind)
    return payload


def check_kind(path: Path, payload: dict[str, Any], kind: str) -> None:
    """A checkpoint of ``kind`` this version reads, or one line that says why not."""
    found_format = int(payload.get("format", 1))
    found = payload.get("kind")
    if found is None:  # written before checkpoints carried their kind
        if found_format == UNMARKED_FORMATS[kind]:
            return
        raise CheckpointError(
            f"{path}: a {kind} checkpoint from an older raylocal (format {found_format}; this version reads "
            f"{FORMAT}); start the run afresh"
        )
    if found != kind:
        raise CheckpointError(f"{path}: a {found} checkpoint, not a {kind} checkpoint")
    if found_format != FORMAT:
        age = "newer" if found_format > FORMAT else "older"
        raise CheckpointError(
            f"{path}: a {kind} checkpoint from a {age} raylocal (format {found_format}; this version reads "
            f"{FORMAT}); {'upgrade raylocal' if age == 'newer' else 'start the run afresh'}"
        )
