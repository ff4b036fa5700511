"""`python -m tools.bench methods`: images/s of every image discovery method on one fixed synthetic
workload, the keys (and CLS attention, and picture) of a ViT-S/16 on a 480x640 image: 30x40 patches of 384
dimensions. Only the method is timed (no backbone, no refinement); best of 3 after a warm-up.

Sources of the settings: configs/methods/ (MaskCut, TokenCut, LOST) and configs/pending/ (the rest).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import yaml

from stages.common.paths import CONFIG_DIR
from stages.discovery.deep_spectral import deep_spectral
from stages.discovery.found import FoundHead, found, keys_to_map
from stages.discovery.freemask import freemask
from stages.discovery.lost import lost
from stages.discovery.maskcut import maskcut
from stages.discovery.ncut import binary_affinity, smallest_eigenvectors, treat_keys
from stages.discovery.no_object import NoObjectRule
from stages.discovery.tokencut import tokencut
from stages.discovery.votecut import eigenvector_candidates, votecut
from tools.bench_ncut import scene_keys

GRID = (30, 40)
DIM, HEADS, PATCH = 384, 6, 16
IMAGES = 4  # different scenes, so that no method is timed on one lucky graph
CONFIGS = CONFIG_DIR


def method(name: str) -> dict:
    path = CONFIGS / "methods" / f"{name}.yaml"
    return yaml.safe_load((path if path.exists() else CONFIGS / "pending" / f"{name}.yaml").read_text())[
        "method"
    ]


def workload() -> list[dict]:
    """IMAGES scenes: raw keys = a shared key bias + scene keys, CLS attention, the picture."""
    rng = np.random.default_rng(0)
    bias = 3.0 * torch.randn(DIM, generator=torch.Generator().manual_seed(0))
    scenes = []
    for i in range(IMAGES):
        keys = scene_keys(GRID, 1 + i % 3, DIM, rng) + bias
        logits = torch.from_numpy(rng.standard_normal((HEADS, GRID[0] * GRID[1]))).float()
        picture = (rng.random((GRID[0] * PATCH, GRID[1] * PATCH, 3)) * 255).astype(np.uint8)
        scenes.append(
            {"keys": keys, "bias": bias, "attention": (2 * logits).softmax(dim=1), "image": picture}
        )
    return scenes


def runners() -> dict:
    """name -> run(scene) with each method's defaults (DINOv2 key treatments where a method has them)."""
    mc, tc, lo = method("maskcut"), method("tokencut"), method("lost")
    fo, ds, fm, vc = method("found"), method("deep_spectral"), method("freemask"), method("votecut")
    graph = mc["graph"]["dinov2"]
    fm_params = {
        k: fm[k]
        for k in (
            "mask_threshold",
            "sigma",
            "max_masks",
            "min_score",
            "top_margin",
            "max_width",
            "max_candidates",
        )
    }

    def run_votecut(s):
        candidates = []
        for treatment in ("centered", "no_bias"):  # 2 treatments x 2 graphs: 4 sources (CuVLER: 6 backbones)
            unit = torch.nn.functional.normalize(treat_keys(s["keys"], treatment, s["bias"]), dim=1)
            for tau in (0.0, 0.15):
                vectors = smallest_eigenvectors(binary_affinity(unit, tau, 1e-5), 1, "fast").vectors
                candidates += eigenvector_candidates(
                    vectors, GRID, tuple(vc["ks"]), vc["min_box"], vc["max_components"]
                )
        return votecut(
            candidates,
            GRID,
            vc["iou_threshold"],
            vc["pivot_moves"],
            vc["tau_m"],
            vc["max_masks"],
            vc["min_votes"],
        )

    return {
        "MaskCut": lambda s: maskcut(
            s["keys"],
            GRID,
            graph["tau"],
            mc["eps"],
            graph["center_keys"],
            mc["n_masks"],
            mc["max_overlap"],
            mc["min_area"],
            mc["solver"],
        ),
        "TokenCut": lambda s: tokencut(
            s["keys"], GRID, tc["graph"]["dinov2"]["tau"], tc["eps"], True, tc["solver"]
        ),
        "LOST": lambda s: lost(s["keys"], GRID, lo["k"]),
        "FOUND": lambda s: found(
            treat_keys(s["keys"], fo["keys"]["dinov2"], s["bias"]),
            s["attention"],
            GRID,
            fo["tau"],
            fo["reweight"],
        ),
        "DSM": lambda s: deep_spectral(
            treat_keys(s["keys"], ds["keys"]["dinov2"], s["bias"]),
            GRID,
            s["image"],
            PATCH,
            ds["lambda_knn"],
            ds["downsample"] or PATCH,
            ds["n_eigenvectors"],
            ds["n_segments"],
            ds["solver"],
        ),
        "FreeMask": lambda s: freemask(
            treat_keys(s["keys"], fm["keys"]["dinov2"], s["bias"]), GRID, tuple(fm["scales"]), **fm_params
        ),
        "VoteCut": run_votecut,
    }


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
        lambda s: NoObjectRule.for_image(s["keys"], s["bias"], GRID, 0.8).separates(
            np.eye(*GRID, dtype=bool)
        ),
        scenes,
    )
    lines.append(f"  no-object rule, one mask: {1000 * rule_cost:.2f} ms")
    head = FoundHead(DIM).eval()
    batch = torch.stack([keys_to_map(s["keys"], GRID) for s in scenes])
    seconds = per_image(lambda _: head.predict(batch), [None]) / len(scenes)
    lines.append(f"  FOUND head (1x1 conv) {1000 * seconds:.2f} ms/img ({1 / seconds:.0f} img/s)")
    return lines


if __name__ == "__main__":
    print("\n".join(main()))
