"""The torch fast bilateral solver (stages/refinement/bilateral_solver_torch.py) against the scipy
reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from stages.refinement.bilateral_solver import BilateralConfig
from stages.refinement.bilateral_solver import bilateral_solve as reference_solve
from stages.refinement.bilateral_solver_torch import bilateral_refine, bilateral_solve
from stages.refinement.refine import RefineConfig, mask_iou, refine_mask
from stages.refinement.refine import bilateral_refine as reference_refine
from tests.synthetic import blocky, textured_scene

# The reference's RGB -> YUV in millionths, exact in integers.
YUV_MICRO = np.array([[299000, 587000, 114000], [-168736, -331264, 500000], [500000, -418688, -81312]])


@pytest.fixture(scope="module")
def cfg() -> RefineConfig:
    """The real refinement defaults (configs/defaults.yaml)."""
    return load_config().refine


def without_grid_ties(image: np.ndarray, cfg: BilateralConfig) -> np.ndarray:
    """The image with every pixel whose luma or chroma lies exactly half-way between two grid cells nudged
    by one level: there, which cell float64 rounding picks depends on the order of the sums (BLAS's in the
    reference), so the two implementations may legitimately place that pixel one cell apart."""
    image = image.copy()
    sigmas = np.array([cfg.sigma_luma, cfg.sigma_chroma, cfg.sigma_chroma])
    assert np.all(sigmas == np.rint(sigmas))  # the exact test below needs integer sigmas
    period = (sigmas * 10**6).astype(np.int64)
    while True:
        micro = image.reshape(-1, 3).astype(np.int64) @ YUV_MICRO.T
        tie = ((micro % period) == period // 2).any(axis=1).reshape(image.shape[:2])
        if not tie.any():
            return image
        image[tie, 2] = np.where(image[tie, 2] < 255, image[tie, 2] + 1, 254)


def test_solution_matches_the_reference(cfg):
    image, obj = textured_scene(480, 640)
    image = without_grid_ties(image, cfg.bilateral)
    flips = np.random.default_rng(1).random(obj.shape) < 0.1
    targets = np.stack([blocky(obj), obj ^ flips, np.zeros_like(obj)]).astype(np.float64)
    confidence = np.full(targets.shape, cfg.bilateral.confidence)
    confidence[1] = np.random.default_rng(2).uniform(0.2, 1.0, obj.shape)

    got = bilateral_solve(
        torch.from_numpy(image), torch.from_numpy(targets), torch.from_numpy(confidence), cfg.bilateral
    )

    assert got.dtype == torch.float64 and got.shape == targets.shape
    for target, conf, solved in zip(targets, confidence, got.numpy(), strict=True):
        expected = reference_solve(image, target, conf, cfg.bilateral)
        assert np.abs(solved - expected).max() < 1e-8
    assert not got[2].any()  # a zero target stays exactly zero, as scipy's cg returns it


def test_targets_solved_together_are_solved_as_if_alone(cfg):
    # A nearly constant target starts close to its solution and stops after a few CG steps (6), while the
    # mask's runs to the cap (25): a column that has converged must not move on with the others.
    image, obj = textured_scene(96, 128, seed=1)
    almost_flat = 0.3 + 1e-5 * np.random.default_rng(0).normal(size=obj.shape)
    targets = torch.from_numpy(np.stack([blocky(obj), almost_flat]))
    confidence = torch.full(targets.shape, cfg.bilateral.confidence, dtype=torch.float64)
    together = bilateral_solve(torch.from_numpy(image), targets, confidence, cfg.bilateral)
    for target, conf, solved in zip(targets, confidence, together, strict=True):
        alone = bilateral_solve(torch.from_numpy(image), target, conf, cfg.bilateral)
        assert alone.shape == target.shape
        assert torch.allclose(alone, solved, rtol=0, atol=1e-12)
    assert torch.allclose(together[1], targets[1], atol=1e-3)


def test_refines_like_the_reference_at_full_size(cfg):
    image, obj = textured_scene(480, 640, seed=4)
    coarse = blocky(obj)
    masks = np.stack([coarse, np.roll(obj, (12, -10), axis=(0, 1))])
    got = bilateral_refine(torch.from_numpy(image), torch.from_numpy(masks), cfg.bilateral).numpy()
    for mask, refined in zip(masks, got, strict=True):
        assert mask_iou(refined, reference_refine(image, mask, cfg.bilateral)) > 0.995
    assert mask_iou(got[0], obj) > mask_iou(coarse, obj) + 0.03  # it did move the coarse mask to the mug


def test_rejects_what_the_reference_rejects(cfg):
    # As in test_refine: on a noise-free image a 10x10 square covers less than half of every grid cell it
    # touches, so the solution stays below 0.5 everywhere: an empty mask, rejected. The mug's mask is kept.
    image, obj = textured_scene(160, 192, seed=2)
    image[:] = np.where(obj[..., None], (225, 130, 40), (70, 75, 90)).astype(np.uint8)
    tiny = np.zeros_like(obj)
    tiny[8:18, 150:160] = True
    masks = np.stack([tiny, blocky(obj)])
    got = bilateral_refine(torch.from_numpy(image), torch.from_numpy(masks), cfg.bilateral).numpy()
    for mask, refined in zip(masks, got, strict=True):
        reference_keeps = refine_mask(image, mask, "bilateral", cfg) is not None
        assert reference_keeps == (mask_iou(mask, refined) >= cfg.min_iou)
    assert not got[0].any() and mask_iou(masks[1], got[1]) >= cfg.min_iou


def test_bad_inputs_raise(cfg):
    image = torch.zeros(32, 40, 3, dtype=torch.uint8)
    target = torch.zeros(32, 40, dtype=torch.float64)
    with pytest.raises(ValueError, match="HxWx3"):
        bilateral_solve(image[..., 0], target, target, cfg.bilateral)
    with pytest.raises(ValueError, match="image size"):
        bilateral_solve(image, target[:, :-1], target[:, :-1], cfg.bilateral)
    with pytest.raises(ValueError, match="image size"):
        bilateral_solve(image, target, target[None], cfg.bilateral)
    with pytest.raises(ValueError, match="bool"):
        bilateral_refine(image, target[None], cfg.bilateral)
    assert bilateral_refine(image, torch.zeros(0, 32, 40, dtype=torch.bool), cfg.bilateral).shape[0] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_on_gpu_matches_cpu(cfg):
    image, obj = textured_scene(240, 320, seed=3)
    masks = torch.from_numpy(np.stack([blocky(obj), np.roll(obj, 7, axis=0)]))
    cpu = bilateral_refine(torch.from_numpy(image), masks, cfg.bilateral)
    gpu = bilateral_refine(torch.from_numpy(image).cuda(), masks.cuda(), cfg.bilateral)
    assert gpu.device.type == "cuda"
    for a, b in zip(cpu.numpy(), gpu.cpu().numpy(), strict=True):
        assert mask_iou(a, b) > 0.999
