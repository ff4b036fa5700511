"""tools/compare_methods.py calls the methods' pure functions with the values of configs/methods/: these
tests keep it in step with them (a config key that is not a function argument crashed it once)."""

from __future__ import annotations

import numpy as np
import torch

from tools.compare_methods import PATCH, TREATMENTS, View, runners

GRID = (12, 16)
OBJECT = (slice(3, 9), slice(4, 11))  # rows, columns of the planted object on the patch grid


def planted_view(bias: torch.Tensor) -> View:
    """A view whose keys are the bias plus one direction on the object and another on the background (plus
    a little noise), the object brighter in the picture and less attended by CLS outside it."""
    gen = torch.Generator().manual_seed(0)
    d = bias.numel()
    inside = torch.zeros(GRID, dtype=torch.bool)
    inside[OBJECT] = True
    flat = inside.flatten()
    obj, back = torch.randn(2, d, generator=gen)
    keys = torch.where(flat[:, None], obj, back) + bias + 0.05 * torch.randn(flat.numel(), d, generator=gen)
    cls_attn = torch.where(flat, 1.0, 0.2).expand(4, -1).clone()
    work = np.full((GRID[0] * PATCH, GRID[1] * PATCH, 3), 40, np.uint8)
    work[inside.numpy().repeat(PATCH, 0).repeat(PATCH, 1)] = 220
    valid = np.ones(GRID, dtype=bool)
    return View(keys, cls_attn, GRID, work, valid, (1.0, 1.0))


def test_every_method_runs_with_every_key_treatment_and_its_configured_values():
    bias = 5 * torch.randn(64, generator=torch.Generator().manual_seed(1))
    view = planted_view(bias)
    truth = np.zeros(GRID, dtype=bool)
    truth[OBJECT] = True
    for name, (_, run, taus) in runners(bias).items():
        for treatment in TREATMENTS:
            result = run(view, treatment, taus[0], None)
            assert all(m.shape == GRID for m in result.masks), (name, treatment)
        # Without its bias the planted object is the only structure: every method's main mask covers it,
        # or its complement (a foreground method may call the larger side background).
        found = run(view, "no_bias", taus[0], None).box_mask
        assert found is not None, name
        iou = max(
            (found & truth).sum() / (found | truth).sum(), (~found & truth).sum() / (~found | truth).sum()
        )
        assert iou >= 0.9, (name, iou)
