"""Benchmark of the ssl-vos core (stages/video/power_iteration.py, stages/video/flow_consistency.py,
stages/video/optical_flow.py) on synthetic videos: frames/s of the spectral initialisation (graph + PIC) and
of the global optimisation timed apart, PIC against a dense eigensolve of the same frame graphs, and DIS flow.

    python -m tools.bench sslvos        (or python -m tools.bench_sslvos)

Not a test: it prints numbers. ``planted_video`` makes the synthetic videos (the tests use it too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stages.discovery.ncut import dense_fiedler
from stages.video.flow_consistency import FlowConsistencyParams, flow_consistent_masks
from stages.video.optical_flow import dis_flow
from stages.video.power_iteration import (
    SpectralInitParams,
    dense_power_iteration,
    foreground,
    frame_affinity,
    soft_masks,
    spectral_vectors,
)
from tools.bench import timed


@dataclass
class PlantedVideo:
    """A synthetic video on the patch grid: (T, n, d) keys, (T-1, h, w, 2) exact forward and backward flows
    in patch units, and the (T, h, w) bool truth masks of the moving object."""

    keys: torch.Tensor
    forward: torch.Tensor
    backward: torch.Tensor
    truth: torch.Tensor


def planted_video(
    frames: int,
    grid: tuple[int, int],
    dim: int,
    noise: float = 1.0,
    likeness: float = 0.3,
    size: tuple[int, int] | None = None,
    seed: int = 0,
) -> PlantedVideo:
    """A box (``size`` cells, a third of the grid by default) moving one cell per frame left and right across
    a static background. Background keys share a direction b, object keys are likeness * b + sqrt(1 -
    likeness^2) o (cosine ``likeness`` with the background), plus Gaussian noise of norm ~``noise`` per
    patch, so that many object-background pairs pass the graph threshold and many same-side pairs miss it."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    bh, bw = size or (h // 3, w // 3)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    background, obj = basis[0], likeness * basis[0] + (1 - likeness**2) ** 0.5 * basis[1]
    span = w - bw - 2
    lefts = [
        1 + (p % (2 * span) if p % (2 * span) <= span else 2 * span - p % (2 * span)) for p in range(frames)
    ]
    top = (h - bh) // 2
    truth = torch.zeros(frames, h, w, dtype=torch.bool)
    for p, left in enumerate(lefts):
        truth[p, top : top + bh, left : left + bw] = True
    keys = background.repeat(frames, h, w, 1)
    keys[truth] = obj
    keys = keys + noise * torch.randn(frames, h, w, dim, generator=g) / dim**0.5
    forward = torch.zeros(frames - 1, h, w, 2)
    backward = torch.zeros(frames - 1, h, w, 2)
    for p in range(frames - 1):
        step = float(lefts[p + 1] - lefts[p])
        forward[p][truth[p]] = torch.tensor([step, 0.0])
        backward[p][truth[p + 1]] = torch.tensor([-step, 0.0])
    return PlantedVideo(keys.reshape(frames, h * w, dim), forward, backward, truth)


def textured_frames(
    frames: int, size: tuple[int, int], shift: tuple[int, int], seed: int = 0
) -> list[np.ndarray]:
    """(H, W, 3) uint8 frames of a smooth random texture translated by ``shift`` (dx, dy) pixels per frame."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = size
    pad = 8 + max(abs(shift[0]), abs(shift[1])) * frames
    texture = cv2.GaussianBlur(rng.normal(0, 1, (h + 2 * pad, w + 2 * pad, 3)), (0, 0), 2.0)
    texture = ((texture - texture.min()) / (texture.max() - texture.min()) * 255).astype(np.uint8)
    # frame p shows the texture moved by p * shift: frame_p(x) = texture(x - p shift)
    return [
        np.ascontiguousarray(
            texture[pad - p * shift[1] : pad - p * shift[1] + h, pad - p * shift[0] : pad - p * shift[0] + w]
        )
        for p in range(frames)
    ]


def _solvers(grid: tuple[int, int], dim: int, frames: int, dense_reps: int, device: str) -> str:
    """PIC vs the dense generalized eigensolve (ncut.dense_fiedler, TokenCut's reference solver) on the same
    frame graphs, per frame; the graph (the batched key product, shared by both) timed apart."""
    video = planted_video(frames, grid, dim, seed=1)
    keys = video.keys.to(device)
    params = SpectralInitParams()
    graph_s, affinity = timed(lambda: frame_affinity(keys, None, params), 3)
    pic_s, result = timed(lambda: dense_power_iteration(affinity, params.tol, params.max_steps), 5)
    dense_s, vectors = timed(lambda: torch.stack([dense_fiedler(a) for a in affinity[:dense_reps]]), 1)
    pic_frame, dense_frame, graph_frame = pic_s / frames, dense_s / dense_reps, graph_s / frames
    same = foreground(result.vectors[:dense_reps].cpu()) == foreground(vectors.float().cpu())
    agree = float(same.float().mean())
    return (
        f"spectral init {grid[0]}x{grid[1]} d={dim}: PIC {1000 * pic_frame:.2f} ms/frame "
        f"({int(result.steps.median())} steps median) vs dense eigensolve {1000 * dense_frame:.0f} ms/frame "
        f"-> "
        f"{dense_frame / pic_frame:.0f}x; graph {1000 * graph_frame:.1f} ms/frame; with the graph "
        f"{1 / (graph_frame + pic_frame):.1f} vs {1 / (graph_frame + dense_frame):.2f} frames/s "
        f"({(graph_frame + dense_frame) / (graph_frame + pic_frame):.0f}x); same foreground patches: "
        f"{100 * agree:.1f}%"
    )


def _video(
    frames: int, grid: tuple[int, int], dim: int, scale: int, fine_frames: int, device: str
) -> list[str]:
    """The core on one video: spectral init, then the optimisation at the patch grid, and on its first
    ``fine_frames`` frames at ``scale`` times the grid (the paper's second, finer pass), each timed apart."""
    from stages.video.optical_flow import resize_flow

    video = planted_video(frames, grid, dim, seed=2)
    keys, fwd, bwd = video.keys.to(device), video.forward.to(device), video.backward.to(device)
    init_s, result = timed(lambda: spectral_vectors(keys, fwd, bwd, SpectralInitParams()), 1)
    init = soft_masks(result.vectors).reshape(frames, *grid)
    params = FlowConsistencyParams()
    opt_s, _ = timed(lambda: flow_consistent_masks(init, fwd, bwd, params), 1)
    fine = (grid[0] * scale, grid[1] * scale)
    up = torch.nn.functional.interpolate(init[:fine_frames, None], size=fine, mode="bilinear")[:, 0].clamp(
        0, 1
    )
    pairs = slice(0, fine_frames - 1)
    ffwd, fbwd = resize_flow(fwd[pairs], fine), resize_flow(bwd[pairs], fine)
    fine_s, _ = timed(lambda: flow_consistent_masks(up, ffwd, fbwd, params), 1)
    return [
        f"video {frames} frames {grid[0]}x{grid[1]} d={dim}: spectral init (graphs + PIC, flow features) "
        f"{frames / init_s:.1f} frames/s; optimisation at {grid[0]}x{grid[1]} {frames / opt_s:.1f} "
        f"frames/s, at {fine[0]}x{fine[1]} {fine_frames / fine_s:.2f} frames/s ({fine_frames} frames) "
        f"(LBFGS {params.steps}x{params.inner_steps}, window {params.window})"
    ]


def _flow(size: tuple[int, int], preset: str) -> str:
    frames = textured_frames(2, size, (3, 2))
    seconds, flow = timed(lambda: dis_flow(frames[0], frames[1], preset), 5)
    error = float(np.abs(flow[16:-16, 16:-16] - np.array([3.0, 2.0])).mean())
    return (
        f"DIS flow ({preset}) {size[0]}x{size[1]}: {1000 * seconds:.0f} ms per direction, "
        f"{1 / (2 * seconds):.1f} frame pairs/s (forward + backward); mean error {error:.3f} px on a "
        f"(3, 2) px shift"
    )


def report() -> list[str]:
    """The lines ``make bench`` prints for this section."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [
        _solvers((30, 40), 384, 16, 3, device),  # ViT-S/16 at 480x640
        _solvers((60, 60), 768, 8, 1, device),  # ViT-B/8 at 480x480
    ]
    lines += _video(100, (30, 40), 384, 4, 24, device)
    lines += [_flow((384, 640), "medium"), _flow((384, 640), "fast")]
    return lines


def main() -> None:
    print(*report(), sep="\n")


if __name__ == "__main__":
    main()
