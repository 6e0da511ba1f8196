"""Joining Ray, and Ray's errors in one line: the connection every Ray entry point shares."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from raylocal.core.config import RaylocalConfig, data_source
from raylocal.core.data import NodeImages
from raylocal.errors import ClusterError, RaylocalError

if TYPE_CHECKING:
    import torch


def node_images(config: RaylocalConfig, train: torch.Tensor) -> NodeImages | None:
    """What an actor loads on its own node in place of ``train`` (``images_from="node"``), else None.
    The actors never download: the driver did, where it had to."""
    if config.data.images_from != "node":
        return None
    return NodeImages.of(replace(data_source(config), download=False), train)


def _error_names(cls: type) -> set[str]:
    return {cls.__name__}.union(*(_error_names(sub) for sub in cls.__subclasses__()))


_RAYLOCAL_ERRORS = _error_names(RaylocalError)  # the names an actor's own errors print under


def _last_error_line(text: str) -> tuple[str, str] | None:
    """(exception class, message) of the last ``Name: message`` line of a traceback's text."""
    for line in reversed(text.strip().splitlines()):
        m = re.match(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception|Interrupt)): (.*)$", line)
        if m:
            return m.group(1), m.group(2).strip()
    return None


def actor_error(e: BaseException) -> RaylocalError | None:
    """The one line for an error that Ray brought back from an actor or task: the
    actor's own error when it is one of ours (``error: 500 parts but ...``),
    else what failed where, with its first line, never Ray's traceback. None
    for anything that is not Ray's report of a remote error."""
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause
        if isinstance(cause, RaylocalError):
            return cause
        if cause is not None:
            first = (str(cause).strip().splitlines() or [""])[0][:200]
            return ClusterError(f"{e.function_name} failed: {type(cause).__name__}: {first}".rstrip(": "))
        found = _last_error_line(str(e))
        return ClusterError(f"{e.function_name} failed" + (f": {found[0]}: {found[1]}" if found else ""))
    if isinstance(e, ray.exceptions.RayActorError):
        found = _last_error_line(str(e))
        if found and found[0] in _RAYLOCAL_ERRORS:
            return ClusterError(found[1])
        first = (str(e).strip().splitlines() or ["an actor died"])[0][:200]
        return ClusterError(f"{found[0]}: {found[1]}" if found else first)
    return None


@contextlib.contextmanager
def errors_in_one_line() -> Iterator[None]:
    """Errors raised inside actors reach the user as one line (``actor_error``)."""
    try:
        yield
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
        raise actor_error(e) from None  # type: ignore[misc]


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise ClusterError(f"cannot reach Ray at {address!r}: {e.strerror or e}") from None


# Ray Train's placement-group cleaner asks the State API every second whether the
# fine-tune's controller lives; the State API needs the dashboard, which an embedded
# Ray does not start, so it warns every second of the fine-tune (hundreds of lines)
# and can do nothing there. The driver leaves these lines out of what it prints.
RAY_NOISE = ("Failed to query Ray Train Controller actor state",)


def drop_ray_noise(dispatcher: Any = None) -> None:
    """Filter the worker lines Ray prints in this driver (``log_to_driver``): every
    line but those of ``RAY_NOISE``. Ray's dispatcher of worker output is
    internal; where it is not what this expects, nothing changes."""
    if dispatcher is None:
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
    handlers = getattr(dispatcher, "handlers", None)
    if not isinstance(handlers, list):
        return

    def filtered(print_lines: Callable[[dict], None]) -> Callable[[dict], None]:
        def emit(data: dict) -> None:
            lines = [line for line in data.get("lines", []) if not any(n in line for n in RAY_NOISE)]
            if lines:
                print_lines({**data, "lines": lines})

        emit.drops_ray_noise = True  # type: ignore[attr-defined]
        return emit

    dispatcher.handlers = [(name, h if getattr(h, "drops_ray_noise", False) else filtered(h)) for name, h in handlers]


def connect(config: RaylocalConfig) -> None:
    """Join ``--address`` (or RAY_ADDRESS), else start an embedded local Ray."""
    if ray.is_initialized():
        return
    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # "local": a Ray of its own, never one a file in /tmp/ray names (it may be long dead)
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
    except Exception as e:  # Ray raises many types here, some of them bare Exception
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"reach Ray at {address!r}" if address else "start a local Ray instance"
        raise ClusterError(f"cannot {where}: {first[:160]}") from None
    drop_ray_noise()


@contextlib.contextmanager
def standing_in(directory: Path) -> Iterator[None]:
    """Work with ``directory`` as the process's own, then go back if the old one
    is still there. Under `ray job submit` the job's working directory, the
    driver's own, can be removed under it (where nodes share a Ray temp directory,
    each node's agent unpacks the job's code there anew; README, "Run on a
    cluster"): what runs inside (Tune's results, a run's phases) must not depend on it."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:  # already removed: there is nothing to come back to
        cwd = None
    os.chdir(directory)
    try:
        yield
    finally:
        if cwd is not None and os.path.isdir(cwd):
            os.chdir(cwd)
