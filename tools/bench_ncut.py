"""Benchmark of the normalized-cut eigensolvers (stages/discovery/ncut.py): parity of 'fast' with 'dense' on
a fixed, seeded set of synthetic graphs, and the speed of the discovery step (keys in, masks out) with each.

    python -m tools.bench_ncut [--graphs 200] [--dense-reps 1] [--device cpu]

Not a test: it prints a report. ``parity_report`` and ``time_discovery`` are importable for ``make bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from pipeline.config import load_config
from stages.discovery.base import keys_to_masks
from stages.discovery.ncut import (
    binary_affinity,
    canonical_sign,
    fiedler_vector,
    lanczos_fiedler,
    treat_keys,
    unit_keys,
)
from tools.bench import timed

# Parity thresholds of the report (what counts as "the same answer").
SAME_IOU = 0.99  # bipartitions v > mean agree at this IoU or better
NEAR_DEGENERATE_GAP = 1e-8  # lambda3 - lambda2 below this: neither solver pins the 2nd eigenvector down
VALID_RESIDUAL = 1e-5  # a vector whose float64 eigen-residual is below this is an eigenvector


# ----------------------------------------------------------------------------------------------------------
# Synthetic graphs


def planted_keys(
    grid: tuple[int, int],
    boxes: list[tuple[int, int, int, int]],
    noise: float,
    dim: int,
    rng: np.random.Generator,
    shared: bool = False,
) -> torch.Tensor:
    """(h*w, dim) keys: background patches share direction b, object j (box y0, x0, y1, x1) has
    o_j - 0.5 b, so objects anti-correlate with the background; plus Gaussian noise of norm ~``noise``.
    ``shared`` gives every object the same direction (a symmetric, possibly degenerate, scene)."""
    h, w = grid
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    keys = np.tile(basis[0], (h, w, 1))
    for j, (y0, x0, y1, x1) in enumerate(boxes):
        keys[y0:y1, x0:x1] = basis[1 if shared else 1 + j] - 0.5 * basis[0]
    keys = keys + noise * rng.standard_normal((h, w, dim)) / np.sqrt(dim)
    return torch.from_numpy(keys.reshape(h * w, dim)).float()


def scene_keys(grid: tuple[int, int], n_objects: int, dim: int, rng: np.random.Generator) -> torch.Tensor:
    """(h*w, dim) keys of a harder, more image-like scene than ``planted_keys``: one to three background
    regions (bands) with related directions, a smooth spatial field (so similarity decays with distance),
    boxes and ellipses whose directions are partly shared with the background (o - beta b, beta in
    [-0.2, 0.8]) or with another object, and Gaussian noise (0.2 to 1.5)."""
    h, w = grid
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    b = basis[0]
    keys = np.tile(b, (h, w, 1))
    cuts = np.sort(rng.uniform(0.2, 0.9, int(rng.integers(0, 3)))) * h / max(h, w)
    for k, y in enumerate(cuts):  # lower bands: 'ground', 'water', ... related to the sky direction b
        keys[ys >= y] = b + rng.uniform(0.3, 1.5) * basis[dim - 1 - k]
    for _ in range(int(rng.integers(0, 5))):  # smooth field: low-frequency waves along random directions
        f = rng.uniform(0.5, 3.0, 2) * rng.choice([-1, 1], 2)
        wave = np.cos(2 * np.pi * (f[0] * ys + f[1] * xs) + rng.uniform(0, 2 * np.pi))
        keys += rng.uniform(0.1, 0.8) * wave[..., None] * basis[int(rng.integers(8, dim - 4))]
    previous = None
    for j in range(n_objects):
        y0, x0, y1, x1 = random_box(grid, rng)
        inside = np.zeros(grid, bool)
        if rng.random() < 0.5:
            inside[y0:y1, x0:x1] = True
        else:
            cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2 + 0.5, (x1 - x0) / 2 + 0.5
            yy, xx = np.mgrid[0:h, 0:w]
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        direction = basis[1 + j] - rng.uniform(-0.2, 0.8) * b
        if previous is not None and rng.random() < 0.3:  # a part of, or similar to, the previous object
            direction = direction + rng.uniform(0.3, 1.0) * previous
        keys[inside] = direction
        previous = direction
    keys = keys + rng.uniform(0.2, 1.5) * rng.standard_normal((h, w, dim)) / np.sqrt(dim)
    return torch.from_numpy(keys.reshape(h * w, dim)).float()


def random_box(grid: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box covering roughly 2% to 35% of the grid, anywhere on it."""
    h, w = grid
    bh = max(1, int(h * rng.uniform(0.15, 0.6)))
    bw = max(1, int(w * rng.uniform(0.15, 0.6)))
    y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    return y0, x0, y0 + bh, x0 + bw


def random_grid(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    """A grid of about n nodes, n log-uniform in [lo, hi], aspect ratio between 1:2 and 2:1."""
    n = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    h = max(4, round(np.sqrt(n * aspect)))
    w = max(4, min(round(n / h), hi // h))
    return h, w


def flip_edges(affinity: torch.Tensor, fraction: float, eps: float, rng: np.random.Generator) -> torch.Tensor:
    """Swap 1 <-> eps on a random symmetric ``fraction`` of the off-diagonal pairs."""
    n = affinity.shape[0]
    pick = np.triu(rng.random((n, n)) < fraction, 1)
    pick = torch.from_numpy(pick | pick.T)
    flipped = torch.where(affinity > 0.5, eps, 1.0).to(affinity.dtype)
    return torch.where(pick, flipped, affinity)


@dataclass
class Graph:
    name: str
    affinity: torch.Tensor
    grid: tuple[int, int]


def graph_suite(n_graphs: int, seed: int = 0) -> Iterator[Graph]:
    """The fixed parity set: ``n_graphs`` seeded graphs. Random grids of ~200 to 3600 nodes (one in ten
    above 2000: the dense reference costs n^3); alternately ``planted_keys`` (0-4 boxes, noise 0.2-1.2, a
    shared object direction 15% of the time) and ``scene_keys``; tau 0 (centred keys) / 0.15 / 0.2; then
    perturbations: zeroed rows 30% of the time (MaskCut's taken patches), flipped edges 30% of the time.
    Every tenth graph is a pair of eps-joined cliques (a disconnected graph)."""
    rng = np.random.default_rng(seed)
    eps = 1e-5
    for i in range(n_graphs):
        grid = random_grid(rng, 2000, 3600) if i % 10 == 9 else random_grid(rng, 200, 2000)
        n = grid[0] * grid[1]
        if i % 10 == 4:
            yield Graph(f"{i}:cliques", two_cliques(n, int(rng.integers(n // 10, n // 2)), eps), grid)
            continue
        n_objects, dim = int(rng.integers(0, 5)), int(rng.choice([32, 64, 128]))
        if i % 2:
            keys = scene_keys(grid, n_objects, dim, rng)
            tags = [f"scene{n_objects}"]
        else:
            noise, shared = float(rng.uniform(0.2, 1.2)), bool(rng.random() < 0.15)
            keys = planted_keys(
                grid, [random_box(grid, rng) for _ in range(n_objects)], noise, dim, rng, shared
            )
            tags = [f"planted{n_objects}", f"noise{noise:.2f}"] + (["shared"] if shared else [])
        tau, center = [(0.0, True), (0.15, False), (0.2, False)][int(rng.integers(3))]
        feats = unit_keys(keys, center)
        tags.append(f"tau{tau}")
        if rng.random() < 0.3:  # MaskCut after a cut: the taken patches become eps-only rows
            y0, x0, y1, x1 = random_box(grid, rng)
            taken = torch.zeros(grid, dtype=torch.bool)
            taken[y0:y1, x0:x1] = True
            feats = feats.masked_fill(taken.reshape(-1, 1), 0.0)
            tags.append("zeroed")
        affinity = binary_affinity(feats, tau, eps)
        if rng.random() < 0.3:
            fraction = float(rng.uniform(0.001, 0.03))
            affinity = flip_edges(affinity, fraction, eps, rng)
            tags.append(f"flip{fraction:.3f}")
        yield Graph(f"{i}:{grid[0]}x{grid[1]}:" + ",".join(tags), affinity, grid)


def two_cliques(n: int, first: int, eps: float) -> torch.Tensor:
    """Two cliques of ``first`` and n - first nodes joined only by eps edges: a disconnected graph."""
    side = torch.arange(n) < first
    return torch.where(side[:, None] == side[None, :], 1.0, eps)


# ----------------------------------------------------------------------------------------------------------
# Parity


def dense_pair(affinity: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference eigensolve, asked for lambda2 and lambda3 together: (eigenvalues (2,), vectors (n, 2)
    with V^T D V = I, the float64 affinity)."""
    a = affinity.double().numpy()
    d = a.sum(axis=1)
    values, vectors = scipy.linalg.eigh(np.diag(d) - a, np.diag(d), subset_by_index=[1, 2])
    return values, vectors, a


def eigen_check(a: np.ndarray, vec: np.ndarray) -> tuple[float, float]:
    """How good an answer ``vec`` is for the float64 affinity ``a``: (its generalized Rayleigh quotient
    lambda, the residual |N u - (1 - lambda) u| of u = D^1/2 v / |D^1/2 v|; N's norm is 1)."""
    root = np.sqrt(a.sum(axis=1))
    u = root * vec
    u /= np.linalg.norm(u)
    nu = (a @ (u / root)) / root
    mu = float(u @ nu)
    return 1.0 - mu, float(np.linalg.norm(nu - mu * u))


def compare(affinity: torch.Tensor) -> dict:
    """One graph: dense vs fast. Returns lambda2, lambda3, the fast solver's steps, the IoU of the two
    bipartitions (v > mean) and the cosine of the two vectors (both with the canonical sign), and the
    fast vector's own Rayleigh quotient and residual, measured in float64."""
    values, vectors, a = dense_pair(affinity)
    ref = canonical_sign(torch.from_numpy(vectors[:, 0])).numpy()
    start = time.perf_counter()
    result = lanczos_fiedler(affinity)
    seconds = time.perf_counter() - start
    fast = canonical_sign(result.vector).cpu().numpy()
    left, right = ref > ref.mean(), fast > fast.mean()
    union = (left | right).sum()
    fast_lambda, fast_residual = eigen_check(a, fast)
    return {
        "lambda2": float(values[0]),
        "lambda3": float(values[1]),
        "steps": result.steps,
        "converged": result.converged,
        "float64": result.dtype == torch.float64,
        "iou": float((left & right).sum() / union) if union else 1.0,
        "cosine": float(ref @ fast / (np.linalg.norm(ref) * np.linalg.norm(fast))),
        "fast_lambda2": fast_lambda,
        "fast_residual": fast_residual,
        "fast_seconds": seconds,
    }


def valid_answer(row: dict) -> bool:
    """The fast vector is a correct second eigenvector: small float64 residual, and its eigenvalue is
    lambda2 up to the near-degeneracy gap (any vector of a near-degenerate eigenspace qualifies)."""
    return (
        row["fast_residual"] <= VALID_RESIDUAL and row["fast_lambda2"] - row["lambda2"] < NEAR_DEGENERATE_GAP
    )


def parity_report(n_graphs: int, seed: int = 0, verbose: bool = False) -> dict:
    """Dense vs fast on ``graph_suite(n_graphs, seed)``. Graphs whose lambda3 - lambda2 is below
    NEAR_DEGENERATE_GAP have no unique answer: they are counted apart, and there the fast vector must be a
    valid answer (``valid_answer``) instead of giving the same bipartition. Returns the summary and rows."""
    rows = []
    for graph in graph_suite(n_graphs, seed):
        row = {"name": graph.name, "n": graph.affinity.shape[0], **compare(graph.affinity)}
        row["near_degenerate"] = row["lambda3"] - row["lambda2"] < NEAR_DEGENERATE_GAP
        row["valid"] = valid_answer(row)
        rows.append(row)
        if verbose:
            print(
                f"  {row['name']:<44} n={row['n']:5d} l2={row['lambda2']:.3e}"
                f" gap={row['lambda3'] - row['lambda2']:.1e} steps={row['steps']:3d} iou={row['iou']:.4f}"
                f" 1-cos={1 - row['cosine']:.1e} res={row['fast_residual']:.1e}"
                + (" float64" if row["float64"] else "")
            )
    regular = [r for r in rows if not r["near_degenerate"]]
    degenerate = [r for r in rows if r["near_degenerate"]]
    return {
        "graphs": len(rows),
        "same_bipartition": sum(r["iou"] >= SAME_IOU for r in rows) / len(rows),
        "identical_bipartition": sum(r["iou"] == 1.0 for r in rows) / len(rows),
        "valid": sum(r["valid"] for r in rows) / len(rows),
        "regular": len(regular),
        "regular_same_bipartition": sum(r["iou"] >= SAME_IOU for r in regular) / max(1, len(regular)),
        "worst_regular_iou": min((r["iou"] for r in regular), default=1.0),
        "worst_regular_cosine": min((r["cosine"] for r in regular), default=1.0),
        "near_degenerate": len(degenerate),
        "near_degenerate_valid": sum(r["valid"] for r in degenerate),
        "near_degenerate_same_bipartition": sum(r["iou"] >= SAME_IOU for r in degenerate),
        "worst_residual": max(r["fast_residual"] for r in rows),
        "not_converged": sum(not r["converged"] for r in rows),
        "float64_pass": sum(r["float64"] for r in rows),
        "gap_below": {g: sum(r["lambda3"] - r["lambda2"] < g for r in rows) for g in (1e-2, 1e-4, 1e-6)},
        "steps_median": statistics.median(r["steps"] for r in rows),
        "steps_max": max(r["steps"] for r in rows),
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------------
# Timing


def time_discovery(
    method: str, grid: tuple[int, int], dim: int, dense_reps: int, fast_reps: int, device: str = "cpu"
) -> dict:
    """Seconds per image of the discovery step, keys (h*w, dim) in, masks out, with the method's YAML
    defaults (DINO graph settings) and each solver, on a planted scene with three objects (MaskCut finds
    all three at 60x60). Also the solver alone on the first cut's graph, the graph construction alone, and
    whether both solvers gave the same masks."""
    cfg = load_config("demo", method).method
    graph = cfg.graph["dino"]
    rng = np.random.default_rng(2)
    boxes = [random_box(grid, rng) for _ in range(3)]
    keys = planted_keys(grid, boxes, 0.6, dim, rng).to(device)

    def discover(solver: str) -> list[np.ndarray]:
        return keys_to_masks(keys, grid, dataclasses.replace(cfg, solver=solver), "dino")

    unit = unit_keys(treat_keys(keys, graph.keys), False)  # DINO's treatment (raw): no key bias needed
    affinity = binary_affinity(unit, graph.tau, cfg.eps)
    dense_s, dense_masks = timed(lambda: discover("dense"), dense_reps)
    fast_s, fast_masks = timed(lambda: discover("fast"), fast_reps)
    dense_solve_s, _ = timed(lambda: fiedler_vector(affinity, "dense"), dense_reps)
    fast_solve_s, _ = timed(lambda: fiedler_vector(affinity, "fast"), fast_reps)
    affinity_s, _ = timed(
        lambda: binary_affinity(unit_keys(treat_keys(keys, graph.keys), False), graph.tau, cfg.eps), 3
    )
    same = len(dense_masks) == len(fast_masks) and all(
        np.array_equal(a, b) for a, b in zip(dense_masks, fast_masks, strict=False)
    )
    return {
        "method": method,
        "grid": grid,
        "dim": dim,
        "device": device,
        "masks": len(fast_masks),
        "same_masks": same,
        "dense_s": dense_s,
        "fast_s": fast_s,
        "speedup": dense_s / fast_s,
        "dense_solve_s": dense_solve_s,
        "fast_solve_s": fast_solve_s,
        "solve_speedup": dense_solve_s / fast_solve_s,
        "affinity_s": affinity_s,
    }


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=200, help="size of the parity set")
    parser.add_argument("--dense-reps", type=int, default=2, help="timed runs of the dense (slow) solver")
    parser.add_argument("--fast-reps", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="device of the keys and affinity (fast solver)")
    parser.add_argument("--verbose", action="store_true", help="one line per parity graph")
    parser.add_argument("--skip-parity", action="store_true")
    args = parser.parse_args()

    if not args.skip_parity:
        start = time.perf_counter()
        rep = parity_report(args.graphs, verbose=args.verbose)
        print(f"Parity, fast vs dense, {rep['graphs']} seeded graphs ({time.perf_counter() - start:.0f} s):")
        print(
            f"  bipartition IoU >= {SAME_IOU}: {rep['same_bipartition']:.1%} of all graphs,"
            f" {rep['regular_same_bipartition']:.1%} of the {rep['regular']} with a unique answer"
            f" (lambda3 - lambda2 >= {NEAR_DEGENERATE_GAP:g})"
        )
        print(
            f"  identical bipartition: {rep['identical_bipartition']:.1%}; with a unique answer: worst IoU"
            f" {rep['worst_regular_iou']:.4f}, worst cosine of the vectors {rep['worst_regular_cosine']:.10f}"
        )
        print(
            f"  near-degenerate (no unique answer): {rep['near_degenerate']}; the fast vector is an"
            f" eigenvector of eigenvalue lambda2 (residual <= {VALID_RESIDUAL:g})"
            f" in {rep['near_degenerate_valid']},"
            f" with the dense bipartition anyway in {rep['near_degenerate_same_bipartition']}"
        )
        print(f"  valid answers overall: {rep['valid']:.1%}; worst fast residual {rep['worst_residual']:.1e}")
        bands = ", ".join(f"< {g:g}: {c}" for g, c in rep["gap_below"].items())
        print(f"  graphs with lambda3 - lambda2 {bands}; solved again in float64: {rep['float64_pass']}")
        print(
            f"  Lanczos steps median {rep['steps_median']}, max {rep['steps_max']};"
            f" not converged: {rep['not_converged']}"
        )
        bad = [r for r in rep["rows"] if r["iou"] < SAME_IOU]
        for r in bad:
            print(
                f"    differs: {r['name']} l2={r['lambda2']:.4e} l3={r['lambda3']:.4e} iou={r['iou']:.4f}"
                f" valid={r['valid']}"
            )

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Discovery step (keys in, masks out), best-of-runs seconds per image; {torch.get_num_threads()}")
    print(f"  torch threads, {os.cpu_count()} CPUs, load average {load} (other work inflates the times):")
    for method, grid, dim in (("maskcut", (60, 60), 768), ("tokencut", (30, 40), 384)):
        t = time_discovery(method, grid, dim, args.dense_reps, args.fast_reps, args.device)
        print(
            f"  {method} {grid[0]}x{grid[1]} d={dim}: dense {t['dense_s']:.3f}, fast {t['fast_s']:.3f}"
            f" -> {t['speedup']:.1f}x (masks {t['masks']}, same masks: {t['same_masks']})"
        )
        print(
            f"    solver alone on the first graph: dense {t['dense_solve_s']:.3f},"
            f" fast {t['fast_solve_s']:.4f} -> {t['solve_speedup']:.0f}x;"
            f" building the affinity: {t['affinity_s']:.3f}"
        )


if __name__ == "__main__":
    main()
