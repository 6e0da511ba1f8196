"""A plain object called as if it were an actor.

The async run's model service is an actor when the driver only coordinates
(``raylocal train``, ``ray job submit``). A caller that already holds a bundle
of its own (a Ray Tune trial, a benchmark's cell) runs the same service in its
own process instead: ``InProcess`` gives that object an actor handle's calling
convention (``handle.method.remote(*args)`` returns an object reference), so
that the run calls one service the same way wherever it lives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray


class _Method:
    def __init__(self, method: Callable[..., Any]) -> None:
        self.method = method

    def remote(self, *args: Any) -> ray.ObjectRef:
        # an actor is given its arguments' values, never their references (top level only, as Ray does)
        values = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
        return ray.put(self.method(*values))


class InProcess:
    """``obj`` behind an actor handle's calling convention; its methods run in
    this process, at once, when ``.remote`` is called."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.obj, name))


__all__ = ["InProcess"]
