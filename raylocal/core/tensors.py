"""What tensors cost in bytes: the one count behind every byte figure (a wire's
charge, a sync, a broadcast, a model's size)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj``: a tensor, or a mapping, list or tuple of
    them, nested; anything else counts 0."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
