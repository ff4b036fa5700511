"""The global optimisation of ssl-vos (Ponimatkin, Samet et al., WACV 2023): soft foreground masks of all
frames, kept close to their spectral initialisation and made to agree with their neighbours along the
optical flow, by gradient descent on the whole sequence.

Objective, over soft masks X_p in (0, 1) (parametrised by logits, so they stay inside):
    init_weight * mean_p sum_x CE(X_p; X^_p)
  + flow_weight * mean_p sum_x CE(X_p; w(X_(p+1), F_p))          forward consistency
  + flow_weight * mean_p sum_x CE(X_(p+1); w(X_p, B_p))          backward consistency
with CE(x; t) = -t log x - (1 - t) log(1 - x) per pixel, X^_p the initial masks, F_p the flow p -> p+1 on
frame p's grid, B_p the flow p+1 -> p on frame p+1's grid, and w(X, F)(x) = X(x + F(x)) the backward warp
(``optical_flow.warp``): the forward term compares pixel x of frame p with the point x + F_p(x) it moves to
in frame p+1, the backward term pixel x of frame p+1 with the point it came from in frame p. Both sides of
a consistency term get gradients (the warped mask is not detached), as in the public code. Pixels whose
flow leaves the frame, and (``occlusion_check``) pixels whose flow fails the forward-backward check
(``optical_flow.matched``: occluded or disoccluded, so the flow says nothing about the other frame's mask
there), have no partner and are left out of the consistency terms.

Where this departs from the public code (global_optimization.py), on purpose:
- It optimises eigenvectors normalised to unit L2 norm, used at once as logits and as targets of
  BCEWithLogits; here the variables are masks in (0, 1) and the targets probabilities, as the paper's
  objective is written (CE between masks).
- It samples mask p at x + F_p(x) and compares the result with mask p+1 (and mask p+1 at x + B_p(x) with
  mask p), which shifts the masks against the motion; here each flow is used on the grid it is defined on.
- Its flows are resized to the mask grid without rescaling their values; ``optical_flow.resize_flow``
  rescales them.
- Its consistency terms include every pixel, occluded ones too (its ARFlow flows are zeroed where their
  photometric error is in the worst 10%, which serves the affinity features, not the warps); here
  occluded pixels are left out. Without that, the background a moving object covers or uncovers pulls
  the object's leading and trailing edges towards background: on the tests' square moving 3 cells per
  frame, consistency weight 0.5 shrinks every frame's mask to IoU 0.6-0.8 instead of 1.0.
- Its losses are means over pixels; here sums over each frame's pixels (same minimiser): with means the
  gradients are ~1e-6 per pixel, LBFGS skips its curvature updates as negligible and barely moves. A
  re-implementation of its loss on synthetic unit-norm vectors (96x96, 20 frames, its LBFGS settings)
  moved them by 2.6%, almost uniformly: 2e-5 after min-max scaling, i.e. the masks stay as initialised.
- LBFGS keeps 10 curvature pairs instead of torch's default 100, and long videos are optimised in windows
  (below), so memory does not grow with the video.

Weights. At the paper's weights (init 1.0, flow 0.01) the optimum keeps a mask within about 2% of its
initial value, pulled that much towards its neighbours along the flow: a light temporal smoothing that
cannot overturn a confidently wrong frame. A flow weight of 0.5 does overturn it
(tests/test_flow_consistency.py); the weight is to be chosen on real videos.

Windows. Long videos are optimised ``window`` frames at a time, consecutive windows sharing ``overlap``
frames, and each frame is kept from the window it is most central in (``power_iteration.frame_windows``),
so a kept frame sees at least overlap / 2 frames on each side; with window >= T this is the whole-sequence
problem. Memory: about (2 history + 8) x window x h x w floats, whatever the video's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stages.video.optical_flow import matched, warp
from stages.video.power_iteration import frame_windows


@dataclass(frozen=True)
class FlowConsistencyParams:
    """Settings of the global optimisation; defaults from the public ssl-vos code (global_optimization.py,
    its DAVIS and SegTrack-v2 setting) unless said otherwise."""

    init_weight: float = 1.0  # --alpha-c: stay close to the initial masks (FBMS-59: 0.1)
    flow_weight: float = 0.01  # --alpha-e: each of the forward and backward flow consistency terms
    lr: float = 1.0  # --lr of LBFGS (--optim lbfgs)
    steps: int = 5  # --n-iter: LBFGS steps
    inner_steps: int = 20  # LBFGS iterations per step (torch's max_iter default, which the code keeps)
    history: int = 10  # LBFGS curvature pairs (ours: torch's default 100 would hold 200 copies of the masks)
    window: int = 32  # frames optimised together (ours; the public code optimises whole sequences)
    overlap: int = 8  # frames shared by consecutive windows (ours)
    margin: float = 1e-3  # initial masks are clamped into [margin, 1 - margin] (finite logits; ours)
    occlusion_check: bool = True  # leave pixels failing the forward-backward flow check out (ours)


def flow_consistent_masks(
    init: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, params: FlowConsistencyParams
) -> torch.Tensor:
    """Optimised soft masks of a video: (T, h, w) initial masks in [0, 1] (h, w >= 2), (T-1, h, w, 2)
    forward flows p -> p+1 and backward flows p+1 -> p in pixels of the (h, w) grid -> (T, h, w) float32
    soft masks in (0, 1), on init's device. Raises ValueError on mismatched shapes, masks smaller than 2x2
    or values outside [0, 1]."""
    frames, h, w = init.shape
    if h < 2 or w < 2:
        raise ValueError(f"masks must be at least 2x2, got {h}x{w}")
    expected = (frames - 1, h, w, 2)
    if tuple(forward.shape) != expected or tuple(backward.shape) != expected:
        raise ValueError(
            f"{frames} masks of {h}x{w} need forward and backward flows of shape {expected}, got "
            f"{tuple(forward.shape)} and {tuple(backward.shape)}"
        )
    if not bool(((init >= 0) & (init <= 1)).all()):
        raise ValueError("initial masks must lie in [0, 1]")
    logits = torch.logit(init.float().clamp(params.margin, 1 - params.margin))
    targets, forward, backward = logits.sigmoid(), forward.float(), backward.float()
    out = torch.empty_like(logits)
    for start, stop, keep_from, keep_to in frame_windows(frames, params.window, params.overlap):
        pairs = slice(start, stop - 1)
        solved = optimise_window(
            logits[start:stop], targets[start:stop], forward[pairs], backward[pairs], params
        )
        out[keep_from:keep_to] = solved[keep_from - start : keep_to - start]
    return out.sigmoid()


def optimise_window(
    logits: torch.Tensor,
    targets: torch.Tensor,
    forward: torch.Tensor,
    backward: torch.Tensor,
    params: FlowConsistencyParams,
) -> torch.Tensor:
    """LBFGS on consecutive frames: (W, h, w) starting logits and initial masks ``targets`` in (0, 1),
    (W-1, h, w, 2) flows between them -> (W, h, w) optimised logits."""
    # Which pixels have a partner in the neighbouring frame: the flow there passes the forward-backward check
    # (occluded and disoccluded pixels fail it: their flow says nothing about the other frame's mask).
    trusted = (matched(forward, backward), matched(backward, forward)) if params.occlusion_check else None
    variable = logits.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [variable], lr=params.lr, max_iter=params.inner_steps, history_size=params.history
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = objective(variable, targets, forward, backward, params, trusted)
        loss.backward()
        return loss

    for _ in range(params.steps):
        optimiser.step(closure)
    return variable.detach()


def objective(
    variable: torch.Tensor,
    targets: torch.Tensor,
    forward: torch.Tensor,
    backward: torch.Tensor,
    params: FlowConsistencyParams,
    trusted: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The loss (module docstring) of (W, h, w) mask logits with initial masks ``targets`` and the
    (W-1, h, w, 2) flows between consecutive frames, as a scalar tensor. ``trusted``: optional (W-1, h, w)
    bool masks of the forward and backward flows' pixels that take part in the consistency terms (besides
    those whose sample falls inside the frame)."""
    # Per frame: summed over pixels (not averaged), so that gradients and curvature are O(1) per pixel and
    # LBFGS's curvature updates are not skipped as negligible (they are at per-pixel means).
    pixels = variable.shape[1] * variable.shape[2]
    loss = params.init_weight * pixels * F.binary_cross_entropy_with_logits(variable, targets)
    if variable.shape[0] < 2 or params.flow_weight == 0:
        return loss
    masks = variable.sigmoid()
    ahead, inside_ahead = warp(masks[1:], forward)  # frame p+1 seen from frame p
    behind, inside_behind = warp(masks[:-1], backward)  # frame p seen from frame p+1
    if trusted is not None:
        inside_ahead, inside_behind = inside_ahead & trusted[0], inside_behind & trusted[1]
    loss = loss + params.flow_weight * _pair_ce(variable[:-1], ahead, inside_ahead)
    return loss + params.flow_weight * _pair_ce(variable[1:], behind, inside_behind)


def _pair_ce(logits: torch.Tensor, target: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (P, h, w) masks (given by logits) against soft targets, summed over the pixels
    ``inside`` and averaged over the P frame pairs."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (ce * inside).sum() / logits.shape[0]
