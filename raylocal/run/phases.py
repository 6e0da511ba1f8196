"""A run's phases, and what they hand each other.

``Run`` trains a list of phases, one after the other, each a small object with
a ``name`` and ``run(context, carry)``. What one phase hands the next travels in the
``Carry``, in memory (or as Ray references): the parts' plan and result, a
fine-tune trained elsewhere, a rival's trained model, and at the end the run's
summary. Checkpoints stay in the run directory for ``--resume``; no file is
written for the next phase to read.

The phases of each kind of run:

- single-process schedules: ``LocalParts``, ``LocalFinetune``, ``LocalFinish``
  (this module);
- async: ``RayParts`` (raylocal/run/async_run.py), then a finishing route
  (raylocal/run/finish_phase.py): ``ServiceFinish``; ``RayTrainFinetune``; or
  ``DdpFinetune`` and ``ServiceFinish``;
- the rivals: ``DataParallelTraining`` or ``PipelineTraining``, then
  ``FinishTrainedElsewhere`` (raylocal/run/rival_run.py).

The model service and the Ray Train worker that finish an async run train its
fine-tune epochs and end it in their own process, as ``LocalFinetune`` and
``LocalFinish`` do here (``finish_after_parts``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from raylocal.training.schedules import PartsResult, SingleProcessRun

# A fine-tune trained elsewhere (DDP on Ray Train workers): its weights, seconds and per-epoch history
Finetuned = tuple[dict[str, Tensor], float, list[dict[str, Any]]]


@dataclass
class TrainedElsewhere:
    """What a rival's training hands back: the weights, its batches (global,
    each of ``batch_size`` images), its seconds and its per-epoch history."""

    state: dict[str, Tensor]
    steps: int
    seconds: float
    history: list[dict[str, Any]]


@dataclass
class Carry:
    """What a run's phases hand each other. ``summary`` is the finishing phase's;
    ``record`` what other phases add to it (where each phase ran, a rival's own
    figures); ``held`` what the phases hold until the run ends (a Ray run's
    model service, its working directory), released then, also on failure."""

    plan: dict[str, Any] | None = None  # the parts' plan (``ModelService.plan``), once the parts are planned
    parts: PartsResult | None = None  # the parts phase's result, once it ran in this process
    finetuned: Finetuned | None = None
    trained: TrainedElsewhere | None = None
    summary: dict[str, Any] | None = None
    record: dict[str, Any] = field(default_factory=dict)
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def result(self) -> dict[str, Any]:
        """The run's summary: the finishing phase's, with what the others added."""
        if self.summary is None:
            raise RuntimeError("the run's phases ended without finishing it: none made its summary")
        return self.summary | self.record


class Phase(Protocol):
    """One phase of a run: ``run`` trains it in the run's ``context`` (what its
    phases share: a single-process run's ``SingleProcessRun``, an async run's
    ``AsyncContext``, a rival's ``RivalContext``) and hands on what it made in
    ``carry``. A phase holds no configuration of its own: the context does."""

    name: str

    def run(self, context: Any, carry: Carry) -> None: ...


class LocalParts:
    """The parts' epochs of a single-process schedule, in this process."""

    name = "local parts"

    def run(self, session: SingleProcessRun, carry: Carry) -> None:
        session.train_epochs(len(session.plan))


class LocalFinetune:
    """The end-to-end fine-tune epochs, in this process (none in an e2e run: its plan holds them)."""

    name = "local fine-tune"

    def run(self, session: SingleProcessRun, carry: Carry) -> None:
        session.train_epochs(session.total_epochs)


class LocalFinish:
    """The run's end in this process: its checkpoint, last evaluation, samples and summary."""

    name = "finish"

    def run(self, session: SingleProcessRun, carry: Carry) -> None:
        carry.summary = session.finish()


def local_phases(session: SingleProcessRun) -> list[Phase]:
    """A single-process run's phases: its parts' epochs, its fine-tune when it has
    one of its own (an e2e run's plan holds its fine-tune epochs), its end."""
    finetune: list[Phase] = [LocalFinetune()] if session.total_epochs > len(session.plan) else []
    return [LocalParts(), *finetune, LocalFinish()]
