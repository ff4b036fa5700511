"""Optical flow between consecutive video frames, and the two ways ssl-vos uses it on a grid: resized to the
grid of a mask or patch map, and as a backward warp (sample a map of frame q at x + flow(x)).

Convention (OpenCV's and torchvision's): a flow field is an (h, w, 2) float32 array in pixels of its own
grid, channel 0 the horizontal and channel 1 the vertical displacement, defined on the pixels of the first
frame: first(x) ~ second(x + flow(x)). For a sequence of T frames, ``forward[p]`` is the flow p -> p+1 on
frame p's grid and ``backward[p]`` the flow p+1 -> p on frame p+1's grid (both (T-1, h, w, 2)).

Two estimators, both pure (frames in, flow out; caching flows in a run directory is orchestration):
- ``dis_flow``: OpenCV's DIS (dense inverse search, Kroeger et al., ECCV 2016), the default: no weights, CPU.
  The paper uses ARFlow (learned, unsupervised), whose weights cannot be downloaded here.
- ``RaftFlow``: torchvision's RAFT, only from a local checkpoint file in torchvision's layout (never
  downloaded); a missing file is a FileNotFoundError naming it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from stages.common.state_dicts import read_torch_file

DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


def _gray(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB or (H, W) uint8 frame -> (H, W) uint8 gray, contiguous (what DIS reads)."""
    if frame.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frame.dtype}")
    if frame.ndim == 3:
        return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    if frame.ndim == 2:
        return np.ascontiguousarray(frame)
    raise ValueError(f"a frame must be (H, W) or (H, W, 3), got shape {frame.shape}")


def dis_flow(first: np.ndarray, second: np.ndarray, preset: str = "medium") -> np.ndarray:
    """DIS optical flow from ``first`` to ``second``: two (H, W, 3) RGB or (H, W) uint8 frames of one size
    -> (H, W, 2) float32 flow in pixels (first(x) ~ second(x + flow(x))). ``preset``: 'ultrafast', 'fast'
    or 'medium' (OpenCV's speed/accuracy presets). Raises ValueError on mismatched or malformed frames."""
    if preset not in DIS_PRESETS:
        raise ValueError(f"unknown DIS preset '{preset}'; choose from {sorted(DIS_PRESETS)}")
    a, b = _gray(first), _gray(second)
    if a.shape != b.shape:
        raise ValueError(f"frames differ in size: {a.shape} vs {b.shape}")
    # A new instance per call: DIS objects hold per-call state and are not shared across threads.
    return cv2.DISOpticalFlow_create(DIS_PRESETS[preset]).calc(a, b, None)


def sequence_flows(frames: list[np.ndarray], estimate=dis_flow) -> tuple[np.ndarray, np.ndarray]:
    """Forward and backward flow between consecutive frames: T frames (T >= 2) of one size ->
    (forward (T-1, H, W, 2), backward (T-1, H, W, 2)) float32, with ``estimate(first, second)`` (DIS by
    default, or a ``RaftFlow``)."""
    if len(frames) < 2:
        raise ValueError(f"flow needs at least 2 frames, got {len(frames)}")
    forward = np.stack([estimate(a, b) for a, b in zip(frames, frames[1:], strict=False)])
    backward = np.stack([estimate(b, a) for a, b in zip(frames, frames[1:], strict=False)])
    return forward, backward


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W, 2) flow in pixels of its grid -> (..., h, w, 2) flow in pixels of an (h, w) grid that
    covers the same image: the field is resampled bilinearly (area-averaged when shrinking) and each
    component is scaled by the size ratio along its axis, so a displacement keeps its meaning."""
    lead, (height, width) = flow.shape[:-3], flow.shape[-3:-1]
    field = flow.reshape(-1, height, width, 2).permute(0, 3, 1, 2).float()
    mode = "area" if size[0] <= height and size[1] <= width else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    field = F.interpolate(field, size=size, mode=mode, **kwargs)
    scale = torch.tensor([size[1] / width, size[0] / height], device=field.device)
    return (field.permute(0, 2, 3, 1) * scale).reshape(*lead, *size, 2)


def warp(maps: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward warp: (B, h, w) maps of the second frames sampled at x + flow(x), with (B, h, w, 2) flow
    from the first frames (grid units, h, w >= 2). Returns (warped (B, h, w), inside (B, h, w) bool: the
    sample falls inside the second frame; outside it the warped value is meaningless, not a label).
    Bilinear, differentiable in ``maps``; the same operator as ``sampling_matrix``."""
    batch, h, w = maps.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=maps.device, dtype=flow.dtype),
        torch.arange(w, device=maps.device, dtype=flow.dtype),
        indexing="ij",
    )
    x, y = xs + flow[..., 0], ys + flow[..., 1]
    grid = torch.stack((2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1), dim=-1).to(maps.dtype)
    warped = F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    return warped[:, 0], inside


# Forward-backward check (Sundaram, Brox and Keutzer, ECCV 2010; the constants of UnFlow, AAAI 2018): a pixel
# is trusted when following the flow there and back returns within this tolerance.
FB_RELATIVE = 0.01
FB_ABSOLUTE = 0.5  # squared grid pixels


def matched(flow: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
    """Where (B, h, w, 2) ``flow`` (first -> second frames) can be trusted: the sample x + flow(x) falls
    inside the second frame and the ``reverse`` flow (second -> first, on the second frames' grid) leads
    back, |flow(x) + reverse(x + flow(x))|^2 <= FB_RELATIVE (|flow(x)|^2 + |reverse(x + flow(x))|^2) +
    FB_ABSOLUTE. Occluded pixels (covered or leaving in the second frame) fail it. -> (B, h, w) bool."""
    channels = reverse.permute(3, 0, 1, 2).reshape(-1, *reverse.shape[1:3])  # (2B, h, w): x then y
    back, inside = warp(channels, flow.repeat(2, 1, 1, 1))
    back = back.reshape(2, *flow.shape[:3]).permute(1, 2, 3, 0)
    error = (flow + back).square().sum(dim=-1)
    bound = FB_RELATIVE * (flow.square().sum(dim=-1) + back.square().sum(dim=-1)) + FB_ABSOLUTE
    return inside[: flow.shape[0]] & (error <= bound)


def sampling_matrix(flow: torch.Tensor) -> torch.Tensor:
    """The backward warp by an (h, w, 2) flow as a sparse (n, n) matrix S, n = h*w (row-major): row i holds
    the bilinear weights of the up to four pixels of the second frame around x_i + flow(x_i), so
    S @ m.flatten() equals ``warp(m, flow)`` flattened. Corners outside the frame are left out (rows of
    samples leaving the frame sum to less than 1). Returns a sparse COO float32 tensor on flow's device."""
    h, w = flow.shape[:2]
    ys, xs = torch.meshgrid(
        torch.arange(h, device=flow.device), torch.arange(w, device=flow.device), indexing="ij"
    )
    x, y = (xs + flow[..., 0]).flatten(), (ys + flow[..., 1]).flatten()
    x0, y0 = x.floor(), y.floor()
    rows, cols, weights = [], [], []
    row = torch.arange(h * w, device=flow.device)
    for dy in (0, 1):
        for dx in (0, 1):
            cx, cy = x0 + dx, y0 + dy
            weight = (1 - (x - cx).abs()) * (1 - (y - cy).abs())
            keep = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1) & (weight > 0)
            rows.append(row[keep])
            cols.append((cy[keep] * w + cx[keep]).long())
            weights.append(weight[keep].float())
    index = torch.stack((torch.cat(rows), torch.cat(cols)))
    size = (h * w, h * w)
    return torch.sparse_coo_tensor(index, torch.cat(weights), size, check_invariants=True).coalesce()


RAFT_MIN_SIDE = 128


class RaftFlow:
    """torchvision's RAFT (large or small) from a local checkpoint in torchvision's layout (a plain state
    dict, or one under 'state_dict' / 'model'). Never downloads: a missing file is a FileNotFoundError
    naming it, a checkpoint that does not fit the architecture a ValueError naming it.

    Called as ``raft(first, second)`` on two (H, W, 3) uint8 RGB frames -> (H, W, 2) float32 flow in
    pixels (frames are padded to a multiple of 8 for the network and the flow cropped back; sides below
    128 pixels are a ValueError)."""

    def __init__(self, weights: str | Path, small: bool = False, device: str = "cpu", iterations: int = 12):
        from torchvision.models.optical_flow import raft_large, raft_small

        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"RAFT checkpoint not found: '{path}' (flow.weights must name a local torchvision RAFT "
                f"{'small' if small else 'large'} checkpoint; weights are never downloaded)"
            )
        model = (raft_small if small else raft_large)(weights=None, progress=False)
        state = read_torch_file(path)  # UnreadableCheckpoint (a ValueError) for another kind of file
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(
                f"'{path}' is not a torchvision RAFT {'small' if small else 'large'} "
                f"checkpoint: {str(error).splitlines()[0]}"
            ) from None
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.iterations = iterations

    def _tensor(self, frame: np.ndarray) -> torch.Tensor:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"RAFT needs (H, W, 3) uint8 RGB frames, got {frame.dtype} {frame.shape}")
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float().to(self.device)
        return (x / 127.5 - 1.0)[None]  # torchvision's RAFT expects [-1, 1]

    @torch.inference_mode()
    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        a, b = self._tensor(first), self._tensor(second)
        if a.shape != b.shape:
            raise ValueError(f"frames differ in size: {tuple(a.shape)} vs {tuple(b.shape)}")
        h, w = a.shape[-2:]
        if min(h, w) < RAFT_MIN_SIDE:  # its correlation pyramid needs 16 feature cells at 1/8 resolution
            raise ValueError(
                f"RAFT needs frames of at least {RAFT_MIN_SIDE}x{RAFT_MIN_SIDE} pixels, got {h}x{w}"
            )
        pad = (0, -w % 8, 0, -h % 8)  # RAFT works on 1/8 resolution features
        a, b = F.pad(a, pad, mode="replicate"), F.pad(b, pad, mode="replicate")
        flow = self.model(a, b, num_flow_updates=self.iterations)[-1]
        return flow[0, :, :h, :w].permute(1, 2, 0).float().cpu().numpy()
