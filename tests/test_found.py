"""FOUND: the background seed and mask on synthetic keys and CLS attention; its 1x1-convolution head."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stages.discovery.found import (
    FoundBatch,
    FoundState,
    FoundTraining,
    background_seed,
    cls_attention,
    found,
    found_loss,
    head_weights,
    keys_to_map,
    refine_patch_masks,
    train,
)
from tests.scenes import box_mask, iou
from tests.scenes import cls_attention as synthetic_attention
from tests.synthetic import object_image

GRID = (20, 26)
HEADS, HEAD_DIM = 6, 8
OBJECTS = [(3, 2, 10, 9), (5, 14, 14, 22), (14, 4, 18, 11)]
# FOUND's code (configs/found_DUTS-TR.yaml), fewer steps
SCHEDULE = FoundTraining(
    lr=0.05, step_size=50, gamma=0.95, coarse_steps=100, refined_weight=1.5, self_weight=4.0, max_steps=150
)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def head_keys(truth: np.ndarray, noise_heads: float, seed: int = 0) -> torch.Tensor:
    """(h*w, HEADS*HEAD_DIM) keys: in the 3 object-focused heads, background patches share a direction
    and each object has its own (partly shared with the background), with mild noise; the other 3 heads
    carry only noise of norm ``noise_heads`` (heads that attend everywhere and encode little)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(truth.shape[1:], int)
    for j, mask in enumerate(truth, 1):
        labels[mask] = j
    n = labels.size
    keys = np.zeros((n, HEADS, HEAD_DIM))
    for head in range(3):
        basis = np.linalg.qr(rng.standard_normal((HEAD_DIM, HEAD_DIM)))[0]
        directions = [basis[0]] + [0.3 * basis[0] + 0.95 * basis[1 + j] for j in range(len(truth))]
        keys[:, head] = (
            np.array(directions)[labels.reshape(-1)] + 0.25 * rng.standard_normal((n, HEAD_DIM)) / 3
        )
    keys[:, 3:] = noise_heads * rng.standard_normal((n, 3, HEAD_DIM)) / np.sqrt(HEAD_DIM)
    return torch.from_numpy(keys.reshape(n, HEADS * HEAD_DIM)).float()


def scene(noise_heads: float = 1.5, seed: int = 0):
    """Keys, CLS attention and the union of the objects: 3 heads attend to the objects, 3 almost evenly
    to everything but a stretch of background (bottom right) they all but ignore."""
    truth = np.stack([box_mask(GRID, b) for b in OBJECTS])
    union = truth.any(axis=0)
    attention = synthetic_attention(union, heads=HEADS, decoy=(15, 14, 20, 26), seed=seed)
    return head_keys(truth, noise_heads, seed), attention, union


def test_head_weights_favour_sparse_heads_and_the_seed_is_background():
    keys, attention, union = scene()
    weights = head_weights(attention)
    assert weights[:3].min() > weights[3:].max()  # the object-focused heads attend to few patches
    for reweight in (True, False):
        assert not union.reshape(-1)[background_seed(attention, reweight)]


def test_found_finds_every_object_as_the_foreground():
    keys, attention, union = scene()
    foreground = found(keys, attention, GRID, 0.3, True)
    assert iou(foreground, union) >= 0.9
    for box in OBJECTS:  # several objects: each is (almost) all foreground
        assert foreground[box_mask(GRID, box)].mean() >= 0.8


def test_found_fails_with_wrong_parameters():
    keys, attention, union = scene()
    # Without the head weights the noise-only heads dominate the cosine and most background falls below tau.
    assert iou(found(keys, attention, GRID, 0.3, False), union) < 0.6
    # A tau near 1 keeps only the seed's closest neighbours as background.
    assert iou(found(keys, attention, GRID, 0.9, True), union) < 0.6
    # A seed on an object (attention lowest there) makes that object the "background".
    flipped = attention.clone()
    flipped[:, union.reshape(-1)] = 1e-6
    assert iou(found(keys, flipped, GRID, 0.3, True), union) < 0.6


def test_found_shapes_and_cls_attention():
    attention = torch.rand(HEADS, 1 + 12, 1 + 12)
    assert torch.equal(cls_attention(attention), attention[:, 0, 1:])
    with pytest.raises(ValueError):
        found(torch.randn(12, 48), torch.rand(HEADS, 11), (3, 4), 0.3, True)


# ----------------------------------------------------------------------------------------------------------
# The head


def head_data(seed: int, flip: float = 0.15):
    """Features (1, 16, h, w) where objects and background differ along a direction (plus noise), the
    true mask, and a coarse target with ``flip`` of its patches wrong."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(GRID, bool)
    y, x = rng.integers(2, 10, 2)
    truth[y : y + 8, x : x + 10] = True
    direction = rng.standard_normal(16)
    feats = rng.standard_normal((16, *GRID)) + 1.5 * direction[:, None, None] * (2 * truth - 1)
    noisy = truth ^ (rng.random(GRID) < flip)
    return torch.from_numpy(feats).float()[None], torch.from_numpy(truth), torch.from_numpy(noisy)[None]


def batches(seed: int):
    """The same 4 scenes over and over (as epochs over a small dataset would)."""
    data = [head_data(seed + i) for i in range(4)]
    while True:
        for feats, _, target in data:
            yield FoundBatch(feats, target)


def test_head_learns_the_objects_from_noisy_coarse_masks():
    state = train(FoundState.new(16, SCHEDULE, seed=0), batches(0), SCHEDULE)
    assert state.step == SCHEDULE.max_steps
    for i in range(4):
        feats, truth, noisy = head_data(i)
        predicted = state.head.predict(feats)[0]
        # the head denoises its targets: better than the coarse masks it was trained on
        assert iou(predicted.numpy(), truth.numpy()) > 0.95 > iou(noisy[0].numpy(), truth.numpy())


def test_losses_switch_from_coarse_targets_to_self_training():
    feats, truth, noisy = head_data(0)
    logits = torch.randn(1, *GRID, requires_grad=True)
    batch = FoundBatch(feats, noisy, refine=lambda predicted: truth[None])
    early = found_loss(logits, batch, SCHEDULE.coarse_steps - 1, SCHEDULE)
    late = found_loss(logits, batch, SCHEDULE.coarse_steps, SCHEDULE)
    assert set(early) == {"refined", "coarse", "total"} and set(late) == {"refined", "self", "total"}
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert torch.allclose(early["refined"], 1.5 * bce(logits, truth[None].float()))  # the refined prediction
    assert torch.allclose(early["coarse"], bce(logits, noisy.float()))
    assert torch.allclose(late["self"], 4.0 * bce(logits, (logits > 0).float()))


def test_training_resumes_from_a_checkpoint_exactly():
    straight = train(FoundState.new(16, SCHEDULE, seed=1), batches(7), _steps(120), None)
    data = batches(7)
    first = train(FoundState.new(16, SCHEDULE, seed=1), data, _steps(110))  # crosses the loss switch ...
    resumed = FoundState.from_state_dict(first.state_dict(), SCHEDULE)
    second = train(resumed, data, _steps(120))  # ... and the lr steps, then goes on from the checkpoint
    assert second.step == straight.step == 120
    for a, b in zip(second.head.parameters(), straight.head.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert second.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def _steps(n: int) -> FoundTraining:
    return FoundTraining(**{**SCHEDULE.__dict__, "max_steps": n})


def test_keys_to_map_layout():
    keys = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(6, 4)  # 6 patches of a 2x3 grid
    fmap = keys_to_map(keys, (2, 3))
    assert fmap.shape == (4, 2, 3) and torch.equal(fmap[:, 1, 2], keys[5])


def test_bilateral_refinement_snaps_a_coarse_mask_to_the_object():
    patch = 8
    image = object_image(96, 128, (20, 30, 70, 90), seed=0)  # the object covers pixels y 20-70, x 30-90
    truth = np.zeros((12, 16), bool)
    truth[3:9, 4:11] = True  # patches mostly inside the object
    coarse = np.zeros((12, 16), bool)
    coarse[2:8, 3:10] = True  # one patch up and left
    cfg = SimpleNamespace(
        sigma_spatial=16, sigma_luma=16, sigma_chroma=8, lam=256, confidence=0.999, cg_tol=1e-5, cg_maxiter=25
    )
    refined = refine_patch_masks([image], torch.from_numpy(coarse)[None], patch, cfg, 0.5)[0].numpy()
    assert iou(refined, truth) > iou(coarse, truth) + 0.2
    # a refinement that must keep IoU >= 0.99 with its input is rejected: the input comes back
    kept = refine_patch_masks([image], torch.from_numpy(coarse)[None], patch, cfg, 0.99)[0].numpy()
    assert np.array_equal(kept, coarse)
