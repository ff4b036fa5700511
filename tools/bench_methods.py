"""`python -m tools.bench methods`: images/s of every registered image discovery method on one fixed
synthetic workload, the keys (and CLS attention, and picture) of a ViT-S/16 on a 480x640 image: 30x40 patches
of 384 dimensions. Only the method is timed (no backbone, no refinement); best of 3 after a warm-up.

Each method is the registered class built from its configs/methods/<name>.yaml section (the DINOv2
settings: key treatments, and the no-object rule where a method's defaults turn it on), as runs call it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.config import load_config
from stages.discovery.base import METHODS, PatchFeatures
from stages.discovery.found import FoundHead, keys_to_map
from stages.discovery.no_object import NoObjectRule
from tools.bench_ncut import scene_keys

GRID = (30, 40)
DIM, HEADS, PATCH = 384, 6, 16
IMAGES = 4  # different scenes, so that no method is timed on one lucky graph
NAMES = {
    "maskcut": "MaskCut",
    "tokencut": "TokenCut",
    "lost": "LOST",
    "found": "FOUND",
    "deep_spectral": "DSM",
    "freemask": "FreeMask",
    "votecut": "VoteCut",
}


def workload() -> list[PatchFeatures]:
    """IMAGES scenes as a DINOv2 image method receives them: raw keys = a shared key bias + scene keys, the
    last block's attention (only the CLS row is not uniform), the picture, the key bias."""
    rng = np.random.default_rng(0)
    bias = 3.0 * torch.randn(DIM, generator=torch.Generator().manual_seed(0))
    n = GRID[0] * GRID[1]
    scenes = []
    for i in range(IMAGES):
        keys = scene_keys(GRID, 1 + i % 3, DIM, rng) + bias
        logits = torch.from_numpy(rng.standard_normal((HEADS, n))).float()
        attention = torch.full((HEADS, 1 + n, 1 + n), 1.0 / (1 + n))
        attention[:, 0, 0] = 0.0
        attention[:, 0, 1:] = (2 * logits).softmax(dim=1)
        picture = (rng.random((GRID[0] * PATCH, GRID[1] * PATCH, 3)) * 255).astype(np.uint8)
        scenes.append(
            PatchFeatures(
                keys, GRID, "dinov2", patch=PATCH, image=picture, attention=attention, key_bias=bias
            )
        )
    return scenes


def runners() -> dict:
    """name -> the registered method built from its default config section."""
    out = {}
    for name, label in NAMES.items():
        section = load_config("demo", name).method
        out[label] = METHODS.get(name).from_config(section)
    return out


def per_image(run, scenes: list[dict], reps: int = 3) -> float:
    """Shortest mean seconds per image over ``reps`` passes over the scenes (after a warm-up pass)."""
    for s in scenes:
        run(s)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for s in scenes:
            run(s)
        best = min(best, (time.perf_counter() - start) / len(scenes))
    return best


def main() -> list[str]:
    """The section's lines (also printed by ``python -m tools.bench methods``)."""
    scenes = workload()
    lines = [f"methods on {GRID[0]}x{GRID[1]} patches, d={DIM} (ViT-S/16 at 480x640), {IMAGES} scenes:"]
    for name, run in runners().items():
        seconds = per_image(run, scenes)
        lines.append(f"  {name:9s} {1000 * seconds:8.1f} ms/img ({1 / seconds:6.1f} img/s)")
    rule_cost = per_image(
        lambda s: NoObjectRule.for_image(s.keys, s.key_bias, GRID, 0.8).separates(np.eye(*GRID, dtype=bool)),
        scenes,
    )
    lines.append(f"  no-object rule, one mask: {1000 * rule_cost:.2f} ms")
    head = FoundHead(DIM).eval()
    batch = torch.stack([keys_to_map(s.keys, GRID) for s in scenes])
    seconds = per_image(lambda _: head.predict(batch), [None]) / len(scenes)
    lines.append(f"  FOUND head (1x1 conv) {1000 * seconds:.2f} ms/img ({1 / seconds:.0f} img/s)")
    return lines


if __name__ == "__main__":
    print("\n".join(main()))
