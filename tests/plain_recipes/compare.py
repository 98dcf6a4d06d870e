"""Run a recipe's loss and a reference's loss on the same trainer, batch and draws, and return
both losses and the flattened parameter gradients they leave on the trainable roles."""

from __future__ import annotations

import torch

from forcelab.train.recipe import StepContext


def flat_grads(modules) -> torch.Tensor:
    """Every trainable parameter's gradient, flattened and concatenated (zeros where None)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                      for m in modules for p in m.parameters() if p.requires_grad])


def zero_grads(modules) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


def loss_and_grads(compute, modules):
    """compute() -> scalar loss; -> (loss float, flat gradient) after its backward."""
    zero_grads(modules)
    loss = compute()
    loss.backward()
    out = float(loss.detach()), flat_grads(modules)
    zero_grads(modules)
    return out


def step_context(trainer, batch_positions, step: int, role: str) -> StepContext:
    return StepContext(step, 0, trainer.cfg.seed, batch_positions, torch.device("cpu"), role=role)


def assert_same(recipe_out, reference_out, rtol: float = 1e-5, what="", loss_rtol: float | None = None):
    """Losses equal to loss_rtol (default rtol); gradients equal to rtol in norm
    (||g - g_ref|| <= rtol ||g_ref||)."""
    (loss, g), (loss_ref, g_ref) = recipe_out, reference_out
    loss_rtol = rtol if loss_rtol is None else loss_rtol
    assert abs(loss - loss_ref) <= loss_rtol * max(abs(loss_ref), 1e-12), (what, loss, loss_ref)
    gap, size = float((g - g_ref).norm()), float(g_ref.norm())
    assert gap <= rtol * size, (what, gap, size)
