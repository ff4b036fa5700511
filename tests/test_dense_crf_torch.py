"""The torch dense CRF (stages/refinement/dense_crf_torch.py) against pydensecrf, the reference
implementation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
from scipy import ndimage

from pipeline.config import load_config
from stages.refinement.dense_crf_torch import NormalizedKernel, _gaussian_kernel, crf_refine, mean_field
from stages.refinement.refine import RefineConfig, mask_iou, refine_mask
from stages.refinement.refine import crf_refine as reference_crf_refine
from tests.synthetic import blocky, textured_scene


@pytest.fixture(scope="module")
def cfg() -> RefineConfig:
    """The real refinement defaults (configs/defaults.yaml)."""
    return load_config().refine


def reference_logits(features: np.ndarray, unary: np.ndarray, compat: float, iters: int) -> np.ndarray:
    """pydensecrf's mean field on arbitrary (N, d) features with one Potts term: log Q_fg - log Q_bg."""
    n = len(unary)
    crf = dcrf.DenseCRF(n, 2)
    # Energies whose difference U_bg - U_fg is the given unary.
    crf.setUnaryEnergy(np.ascontiguousarray(np.stack([unary / 2, -unary / 2]).astype(np.float32)))
    crf.addPairwiseEnergy(np.ascontiguousarray(features.T.astype(np.float32)), compat=compat)
    q = np.asarray(crf.inference(iters))
    return np.log(q[1]) - np.log(q[0])


@pytest.mark.parametrize("d", [2, 3, 5])
def test_mean_field_on_the_lattice_matches_pydensecrf(d):
    # Clustered features (pixels of a few colours) and a noisy unary: every step of the lattice (elevation,
    # ranks, barycentric weights, blur, normalisation) shows in the logits if it differs from pydensecrf's.
    rng = np.random.default_rng(d)
    centres = rng.uniform(0, 6, (5, d))
    features = centres[rng.integers(0, 5, 3000)] + rng.normal(0, 0.7, (3000, d))
    unary = rng.normal(0, 1.5, 3000)
    kernel = NormalizedKernel.build(torch.from_numpy(features).float(), 2.0)
    for iters in (1, 5):
        expected = reference_logits(features, unary, 2.0, iters)
        got = mean_field(torch.from_numpy(unary).float()[None], [kernel], iters)[0].numpy()
        assert np.abs(got - expected).max() < 1e-3


def test_refines_like_pydensecrf_at_full_size(cfg):
    image, obj = textured_scene(480, 640)
    coarse = blocky(obj)
    shifted = np.roll(obj, (12, -10), axis=(0, 1))
    background = np.zeros_like(obj)
    background[300:420, 40:200] = True  # a block of the striped table
    masks = np.stack([coarse, shifted, background])

    got = crf_refine(torch.from_numpy(image), torch.from_numpy(masks), cfg.crf)

    assert got.dtype == torch.bool and got.shape == masks.shape
    for mask, refined in zip(masks, got.numpy(), strict=True):
        assert mask_iou(refined, reference_crf_refine(image, mask, cfg.crf)) > 0.995
    # The CRF did snap the coarse mask to the mug (so parity is not that of two do-nothing filters).
    assert mask_iou(got[0].numpy(), obj) > mask_iou(coarse, obj) + 0.03


def test_masks_of_one_image_are_refined_as_if_alone(cfg):
    image, obj = textured_scene(96, 128, seed=1)
    masks = torch.from_numpy(np.stack([blocky(obj), np.roll(obj, 5, axis=1), ~obj]))
    together = crf_refine(torch.from_numpy(image), masks, cfg.crf)
    for mask, refined in zip(masks, together, strict=True):
        assert torch.equal(crf_refine(torch.from_numpy(image), mask[None], cfg.crf)[0], refined)


def test_images_of_one_size_share_the_gaussian_kernel_and_get_their_own_refinement(cfg):
    _gaussian_kernel.cache_clear()
    scenes = [textured_scene(96, 128, seed=s) for s in (2, 3)]
    masks = [torch.from_numpy(blocky(obj))[None] for _, obj in scenes]
    in_turn = [
        crf_refine(torch.from_numpy(image), m, cfg.crf) for (image, _), m in zip(scenes, masks, strict=True)
    ]
    assert _gaussian_kernel.cache_info().hits == 1  # built for the first image, reused for the second
    for (image, _), m, refined in zip(scenes, masks, in_turn, strict=True):
        _gaussian_kernel.cache_clear()
        assert torch.equal(crf_refine(torch.from_numpy(image), m, cfg.crf), refined)


def test_rejects_what_the_reference_rejects(cfg):
    # As in test_refine: a tiny square on the uniform wall is erased by the bilateral kernel's pull towards
    # the wall's label, so its refinement is rejected (IoU < min_iou); the mug's own mask is kept.
    image, obj = textured_scene(160, 192, seed=2)
    image[:30] = (70, 75, 90)  # a noise-free wall
    tiny = np.zeros_like(obj)
    tiny[8:18, 150:160] = True
    masks = np.stack([tiny, blocky(obj)])
    got = crf_refine(torch.from_numpy(image), torch.from_numpy(masks), cfg.crf).numpy()
    for mask, refined in zip(masks, got, strict=True):
        reference_keeps = refine_mask(image, mask, "crf", cfg) is not None
        assert reference_keeps == (mask_iou(mask, refined) >= cfg.min_iou)
    assert mask_iou(tiny, got[0]) < cfg.min_iou <= mask_iou(masks[1], got[1])


def test_zero_iterations_give_the_unary_labelling_with_holes_filled(cfg):
    ring = np.zeros((64, 80), bool)
    ring[10:50, 10:60] = True
    ring[20:40, 20:50] = False
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    params = dataclasses.replace(cfg.crf, iters=0)
    got = crf_refine(torch.from_numpy(image), torch.from_numpy(ring[None]), params)[0].numpy()
    assert np.array_equal(got, ndimage.binary_fill_holes(ring))


def test_bad_inputs_raise(cfg):
    image = torch.zeros(32, 40, 3, dtype=torch.uint8)
    masks = torch.zeros(2, 32, 40, dtype=torch.bool)
    with pytest.raises(ValueError, match="uint8"):
        crf_refine(image.float(), masks, cfg.crf)
    with pytest.raises(ValueError, match="image's size"):
        crf_refine(image, masks[:, :-1], cfg.crf)
    with pytest.raises(ValueError, match="bool"):
        crf_refine(image, masks.float(), cfg.crf)
    assert crf_refine(image, masks[:0], cfg.crf).shape == (0, 32, 40)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_on_gpu_matches_cpu(cfg):
    image, obj = textured_scene(240, 320, seed=3)
    masks = torch.from_numpy(np.stack([blocky(obj), np.roll(obj, 7, axis=0)]))
    cpu = crf_refine(torch.from_numpy(image), masks, cfg.crf)
    gpu = crf_refine(torch.from_numpy(image).cuda(), masks.cuda(), cfg.crf)
    assert gpu.device.type == "cuda"
    for a, b in zip(cpu.numpy(), gpu.cpu().numpy(), strict=True):
        assert mask_iou(a, b) > 0.999
