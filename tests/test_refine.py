"""Mask refinement (dense CRF, bilateral solver) on synthetic images with a known object."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.config import load_config
from stages.refinement.bilateral_solver import bilateral_solve
from stages.refinement.refine import (
    REFINERS,
    RefineConfig,
    largest_component,
    mask_iou,
    refine_backend,
    refine_mask,
    refine_masks,
)

H, W = 160, 192
PATCH = 16


@pytest.fixture(scope="module")
def cfg() -> RefineConfig:
    """The real refinement defaults (configs/defaults.yaml)."""
    return load_config().refine


def scene(noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A red disc on a dark green background: (HxWx3 uint8 image, HxW bool true object)."""
    ys, xs = np.indices((H, W))
    obj = (ys - 80) ** 2 + (xs - 88) ** 2 < 44**2
    img = np.empty((H, W, 3))
    img[:] = (40, 90, 40)
    img[obj] = (220, 60, 60)
    img += np.random.default_rng(seed).normal(0.0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), obj


def shifted(obj: np.ndarray) -> np.ndarray:
    """The object moved by (6, 8) pixels: a coarse mask that spills over one side and misses the other."""
    return np.roll(obj, (6, 8), axis=(0, 1))


def blocky(obj: np.ndarray) -> np.ndarray:
    """Patch-level version of the object (a patch is on when it is at least 30% object), as from a ViT."""
    cover = obj.reshape(H // PATCH, PATCH, W // PATCH, PATCH).mean(axis=(1, 3))
    return np.kron(cover >= 0.3, np.ones((PATCH, PATCH))).astype(bool)


@pytest.mark.parametrize("method", ["crf", "bilateral"])
@pytest.mark.parametrize("make_coarse", [shifted, blocky])
def test_refinement_snaps_coarse_mask_to_the_edge(cfg, method, make_coarse):
    image, obj = scene(noise=4.0)
    coarse = make_coarse(obj)
    coarse_iou = mask_iou(coarse, obj)
    assert coarse_iou < 0.9  # the starting point really is coarse

    refined = refine_mask(image, coarse, method, cfg)

    assert refined is not None and refined.dtype == bool and refined.shape == obj.shape
    assert mask_iou(refined, obj) > 0.95
    assert mask_iou(refined, obj) > coarse_iou + 0.05


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("method", ["crf", "bilateral"])
def test_rejects_a_mask_that_refinement_erases(cfg, method, backend):
    # Noise-free, so every bilateral-grid vertex is exactly one 16x16 spatial cell of one colour. A 10x10
    # square (100 px) in the background, away from the disc and the borders, covers less than half of every
    # cell it touches (>= 256 px each), so every vertex's mean target is < 0.5; the solver's output is a
    # weighted average of those means, hence < 0.5 everywhere: the refined mask is empty, IoU 0 < min_iou.
    # For the CRF, the square is tiny next to the bilateral kernel (sxy 50) over a uniform background, whose
    # pull towards background outweighs the weak softmax unary.
    # Both backends (the torch versions on the CPU here) apply the same rule.
    cfg = dataclasses.replace(cfg, backend=backend)
    image, obj = scene(noise=0.0)
    bad = np.zeros_like(obj)
    bad[20:30, 150:160] = True
    assert not (bad & obj).any()

    assert refine_mask(image, bad, method, cfg) is None
    # The same image with a good mask keeps its refinement.
    good = refine_mask(image, obj, method, cfg)
    assert good is not None and mask_iou(good, obj) > 0.95
    # Refined together (the torch version as one batch), each mask gets its own decision, in order.
    kept, rejected, kept_too = refine_masks(image, [obj, bad, obj], method, cfg)
    assert rejected is None and np.array_equal(kept, good) and np.array_equal(kept_too, good)


@pytest.mark.parametrize("method", ["crf", "bilateral"])
def test_torch_backend_snaps_like_the_reference(cfg, method):
    image, obj = scene(noise=4.0)
    coarse = [shifted(obj), blocky(obj)]
    reference = refine_masks(image, coarse, method, dataclasses.replace(cfg, backend="reference"))
    torch_cpu = refine_masks(image, coarse, method, dataclasses.replace(cfg, backend="torch"))
    for ref, tor in zip(reference, torch_cpu, strict=True):
        assert (
            tor is not None and tor.dtype == bool and mask_iou(tor, ref) > 0.99 and mask_iou(tor, obj) > 0.95
        )


def test_auto_backend_is_torch_on_cuda_and_the_faster_one_on_cpu():
    crf, none = REFINERS.get("crf"), REFINERS.get("none")
    assert refine_backend("auto", "cuda", crf) == "torch" and refine_backend("auto", "cuda:1", crf) == "torch"
    assert (
        refine_backend("torch", "cpu", crf) == "torch"
        and refine_backend("reference", "cuda", crf) == "reference"
    )
    # On a CPU: torch from the refiner's measured mask count on (one lattice shared by an image's masks).
    fake = dataclasses.replace(crf, cpu_torch_from=3)
    assert [refine_backend("auto", "cpu", fake, n) for n in (1, 2, 3, 7)] == ["reference"] * 2 + ["torch"] * 2
    assert refine_backend("auto", "cpu", dataclasses.replace(crf, cpu_torch_from=None), 50) == "reference"
    assert refine_backend("torch", "cpu", fake, 1) == "torch"  # asked for: whatever the count
    # A refiner without a torch version runs its reference whatever the backend.
    assert refine_backend("torch", "cuda", none) == refine_backend("auto", "cpu", none, 9) == "reference"


def test_auto_backend_refines_each_image_with_the_implementation_its_mask_count_picks(cfg, monkeypatch):
    # bilateral from 2 masks on: one mask goes to the reference, two to torch (refined as one batch).
    from stages.refinement import refine as module

    calls = []
    bilateral = REFINERS.get("bilateral")
    spy = dataclasses.replace(
        bilateral,
        reference=lambda image, mask, c: calls.append("reference") or bilateral.reference(image, mask, c),
        torch=lambda image, masks, c: (
            calls.append(f"torch x{len(masks)}") or bilateral.torch(image, masks, c)
        ),
        cpu_torch_from=2,
    )
    monkeypatch.setattr(module.REFINERS, "get", lambda name: spy)
    image, obj = scene(noise=4.0)
    auto = dataclasses.replace(cfg, backend="auto")
    (one,) = refine_masks(image, [blocky(obj)], "bilateral", auto)
    two = refine_masks(image, [blocky(obj), shifted(obj)], "bilateral", auto)
    assert calls == ["reference", "torch x2"]
    assert all(m is not None and mask_iou(m, obj) > 0.95 for m in [one, *two])


def test_shards_refined_by_another_implementation_are_another_code_version(monkeypatch):
    # refine.backend is not in the run's hash (same settings) but auto refines differently by device: a run
    # resumed on another kind of machine, or with another backend, must see the finished shards as stale,
    # not mix two refinements in one file.
    import torch

    from pipeline import pseudolabels

    def version(dataset, method, *overrides, device="cpu"):
        monkeypatch.setattr(pseudolabels, "resolve_device", lambda _: torch.device(device))
        return pseudolabels.code_version(load_config(dataset, method, overrides=list(overrides)))

    for method in ("maskcut", "tokencut"):  # CRF, bilateral solver
        reference, torch_cpu = (
            version("demo", method, f"refine.backend={b}") for b in ("reference", "torch")
        )
        assert reference != torch_cpu == version("demo", method, device="cuda")
        first = REFINERS.get(load_config("demo", method).method.refine).cpu_torch_from
        assert version("demo", method) == (
            torch_cpu
            if first == 1
            else reference
            if first is None
            else f"{reference}, torch refinement from {first} masks per image"
        )
    # LOST refines nothing: one version everywhere.
    assert version("demo", "lost", "refine.backend=reference") == version("demo", "lost", device="cuda")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ValueError, match="refine.backend"):
        load_config(overrides=["refine.backend=gpu"])


def test_none_is_identity(cfg):
    image, obj = scene(noise=4.0)
    coarse = blocky(obj)
    assert np.array_equal(refine_mask(image, coarse, "none", cfg), coarse)


def test_unknown_method_raises(cfg):
    image, obj = scene(noise=0.0)
    with pytest.raises(ValueError, match="unknown refinement .grabcut. .known: bilateral, crf, none"):
        refine_mask(image, obj, "grabcut", cfg)


@pytest.mark.parametrize("method", ["crf", "bilateral", "none"])
def test_shape_mismatch_raises(cfg, method):
    image, obj = scene(noise=0.0)
    with pytest.raises(ValueError, match="differs from image size"):
        refine_mask(image, obj[:, :-1], method, cfg)
    with pytest.raises(ValueError, match="HxWx3"):
        refine_mask(image[..., 0], obj, method, cfg)


def test_bilateral_solve_keeps_a_constant_and_respects_edges(cfg):
    image, obj = scene(noise=4.0)
    conf = np.full(obj.shape, cfg.bilateral.confidence)
    flat = bilateral_solve(image, np.full(obj.shape, 0.3), conf, cfg.bilateral)
    assert np.allclose(flat, 0.3, atol=1e-3)
    # Noisy target (the true object with 20% of its pixels flipped): smoothing within each colour region
    # removes the flips, and nothing leaks across the disc's edge.
    flips = np.random.default_rng(1).random(obj.shape) < 0.2
    solved = bilateral_solve(image, (obj ^ flips).astype(float), conf, cfg.bilateral)
    assert solved.shape == obj.shape
    assert mask_iou(solved > 0.5, obj) > 0.98


def test_mask_iou_and_largest_component():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :4] = True
    b[:, 2:6] = True
    assert mask_iou(a, b) == pytest.approx(20 / 60)
    assert mask_iou(a, np.zeros_like(a)) == 0.0
    assert mask_iou(a, a) == 1.0
    two = np.zeros((10, 10), bool)
    two[0:2, 0:2] = True  # 4 px
    two[5:9, 5:9] = True  # 16 px
    two[2, 2] = True  # touches the small blob diagonally only: 4-connectivity keeps it apart
    assert np.array_equal(largest_component(two), np.pad(np.ones((4, 4), bool), ((5, 1), (5, 1))))
    assert not largest_component(np.zeros((4, 4), bool)).any()
