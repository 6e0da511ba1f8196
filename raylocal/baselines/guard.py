"""The rivals' guard against a gradient that is not finite.

The rivals train end to end as their users would, without the parts' rollback
guard: an update whose gradient is not finite is skipped, and a few in a row
end the run in one line (a NaN weight makes every later gradient NaN), rather
than leaving it to end with NaN weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from raylocal.errors import DivergedError
from raylocal.training.trainer import MAX_SKIPS_IN_A_ROW


class NonFiniteGuard:
    """Each update, unless its gradient is not finite: then the weights and the
    optimizer's state stay as they were, and the batch counts as skipped. Under
    DDP the gradient is the all-reduced one, the same on every worker, so the
    workers skip together without a word more on the link."""

    def __init__(
        self, grad_clip: float, limit: int = MAX_SKIPS_IN_A_ROW, who: str = "data-parallel", lr_flag: str = "--lr"
    ) -> None:
        self.grad_clip, self.limit, self.who, self.lr_flag = grad_clip or float("inf"), limit, who, lr_flag
        self.skipped = 0
        self.in_a_row = 0
        self.last_loss = math.nan  # the last update's loss

    def update(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor, step: int) -> bool:
        """Backward and step from ``loss`` (the ``step``-th update); False where it was skipped."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients here
        return self.step(list(model.parameters()), optimizer, loss.detach(), step)

    def step(self, params: list[Tensor], optimizer: torch.optim.Optimizer, loss: Tensor | float, step: int) -> bool:
        """Clip the gradients ``params`` hold and step, or skip where their norm is not finite.
        The loss and the norm are read together: on a GPU, one wait for the device a step."""
        loss = torch.as_tensor(loss, dtype=torch.float64)
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip) if params else torch.zeros((), device=loss.device)
        self.last_loss, norm = torch.stack([loss.reshape(()), norm.to(loss.device, torch.float64)]).tolist()
        if math.isfinite(norm):
            optimizer.step()
            self.in_a_row = 0
            return True
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            raise DivergedError(
                f"{self.who} training diverged: {self.in_a_row} steps in a row without a finite gradient "
                f"(up to step {step}; loss {self.last_loss:.4g}); try a lower {self.lr_flag}"
            )
        return False
