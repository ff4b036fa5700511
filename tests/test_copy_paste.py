"""Copy-paste: CutLER's occlusion rule and geometry, pixels, boxes, counts, determinism, on batches made
here."""

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from stages.detection.copy_paste import CopyPasteLoader, boxes_from_masks, copy_paste, paste, scale_source
from stages.detection.detectron_config import add_cutler_config


def _item(height, width, rects, classes, seed):
    """A detectron2 training dict: random pixels, one rectangular mask per (y0, y1, x0, x1)."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(len(rects), height, width, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(rects):
        masks[i, y0:y1, x0:x1] = True
    inst = Instances((height, width))
    inst.gt_masks = BitMasks(masks)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.as_tensor(classes, dtype=torch.long)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)
    return {"image": image, "instances": inst, "image_id": seed}


def _random_batch(seed, sizes=((96, 128), (80, 112), (96, 128), (64, 96))):
    """Images of different sizes with 1..4 random rectangles; class = 10 * image index + instance index."""
    rng = np.random.default_rng(seed)
    batch = []
    for b, (h, w) in enumerate(sizes):
        n = int(rng.integers(1, 5))
        rects = []
        for _ in range(n):
            y0, x0 = int(rng.integers(0, h - 12)), int(rng.integers(0, w - 12))
            rects.append((y0, int(rng.integers(y0 + 10, h + 1)), x0, int(rng.integers(x0 + 10, w + 1))))
        batch.append(_item(h, w, rects, [10 * b + j for j in range(n)], seed * 100 + b))
    return batch


def _tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = np.nonzero(mask.numpy())
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _snapshot(batch):
    return [
        (d["image"].clone(), d["instances"].gt_masks.tensor.clone(), d["instances"].gt_classes.clone())
        for d in batch
    ]


def _same(snap_a, snap_b) -> bool:
    """Whether two snapshots hold equal images, masks and classes."""
    pairs = zip(snap_a, snap_b, strict=True)
    return all(a.shape == b.shape and torch.equal(a, b) for x, y in pairs for a, b in zip(x, y, strict=True))


def test_paste_occludes_existing_masks_and_drops_only_the_emptied_ones():
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    masks = torch.zeros(4, 40, 50, dtype=torch.bool)
    masks[0, 0:40, 0:40] = True  # 1600 px, loses 168 under the patch: kept, occluded
    masks[1, 12:14, 12:14] = True  # 4 px, loses 1 (25%): kept with 3 px
    masks[2, 35:40, 40:50] = True  # far away: untouched
    masks[3, 30:32, 0:2] = True  # 4 px, untouched: kept whatever its size
    patch_masks = torch.zeros(2, 12, 20, dtype=torch.bool)
    patch_masks[0, 0:12, 0:10] = True
    patch_masks[0, 2:4, 2:4] = False  # a hole over three pixels of mask 1
    patch_masks[0, 2, 3] = True
    patch_masks[1, 4:8, 6:20] = True  # overlaps the first pasted mask
    patch_image = torch.randint(0, 256, (3, 12, 20), dtype=torch.uint8)
    top, left = 10, 10

    new_image, kept_masks, keep, pasted, accepted = paste(
        image, masks, patch_image, patch_masks, top, left, max_occlusion=0.5
    )

    placed = torch.zeros(2, 40, 50, dtype=torch.bool)
    placed[:, 10:22, 10:30] = patch_masks
    cover = placed.any(0)
    assert accepted.tolist() == [True, True] and torch.equal(pasted, placed)
    assert keep.tolist() == [True, True, True, True]
    assert torch.equal(kept_masks, masks & ~cover)
    assert kept_masks[1].sum() == 3
    assert torch.equal(new_image[:, cover], patch_image[:, patch_masks.any(0)])
    assert torch.equal(new_image[:, ~cover], image[:, ~cover])


def test_an_existing_mask_is_dropped_only_when_nothing_is_left():
    image = torch.zeros(3, 20, 20, dtype=torch.uint8)
    masks = torch.zeros(2, 20, 20, dtype=torch.bool)
    masks[0, 0:10, 0:10] = True  # 100 px: 49 covered (< 50%), the object is pasted
    masks[1, 2:3, 3:4] = True  # a single pixel inside the 49 covered pixels
    patch = torch.zeros(1, 7, 7, dtype=torch.bool)
    patch[0] = True
    _, kept_masks, keep, pasted, accepted = paste(image, masks[:1], image[:, :7, :7], patch, 0, 0, 0.5)
    assert accepted.tolist() == [True] and keep.tolist() == [True] and kept_masks[0].sum() == 51
    # the one-pixel mask is covered whole (100% >= 50%): the object is not pasted, the mask survives
    _, kept_masks, keep, pasted, accepted = paste(image, masks, image[:, :7, :7], patch, 0, 0, 0.5)
    assert accepted.tolist() == [False] and keep.tolist() == [True, True] and len(pasted) == 0
    assert torch.equal(kept_masks, masks)


@pytest.mark.parametrize("covered", [49, 50, 51, 100])
def test_a_paste_covering_half_of_an_existing_mask_is_rejected(covered):
    # An existing 10x10 mask; the pasted object covers `covered` of its pixels: 50% or more is refused.
    target = _item(40, 40, [(20, 30, 20, 30), (0, 2, 0, 2)], [0, 1], seed=12)
    source = _item(40, 40, [(0, 1, 0, 1)], [9], seed=13)
    masks = source["instances"].gt_masks.tensor.clone()
    masks[0] = False
    rows, rest = divmod(covered, 10)
    masks[0, 20 : 20 + rows, 20:30] = True
    masks[0, 20 + rows, 20 : 20 + rest] = True
    source["instances"].gt_masks = BitMasks(masks)
    out = copy_paste([target, source], (1.0, 1.0), 0.5, np.random.default_rng(0))[0]
    if covered >= 50:
        assert out is target  # nothing pasted, the target untouched
    else:
        inst = out["instances"]
        assert inst.gt_classes.tolist() == [0, 1, 9]
        assert inst.gt_masks.tensor[0].sum() == 100 - covered


def test_boxes_from_masks_match_detectron2_including_empty_masks():
    masks = torch.rand(6, 30, 40, generator=torch.Generator().manual_seed(0)) > 0.97
    masks[2] = False
    masks[3] = False
    masks[3, 5, 7] = True  # a single pixel: box (7, 5, 8, 6)
    boxes = boxes_from_masks(masks)
    assert torch.equal(boxes, BitMasks(masks).get_bounding_boxes().tensor)
    assert boxes[2].tolist() == [0.0] * 4 and boxes[3].tolist() == [7.0, 5.0, 8.0, 6.0]


def test_paste_rejects_a_patch_outside_the_image():
    image = torch.zeros(3, 20, 20, dtype=torch.uint8)
    patch = torch.ones(1, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="does not fit"):
        paste(image, torch.zeros(0, 20, 20, dtype=torch.bool), image[:, :8, :8], patch, 15, 0, 0.5)


def test_pasted_object_carries_source_pixels_and_removes_target_pixels():
    # Same size and ratio 1: the source image is pasted unscaled, at (0, 0), its object where it was.
    target = _item(60, 80, [(5, 55, 5, 75), (0, 6, 0, 6)], [0, 1], seed=1)
    source = _item(60, 80, [(20, 35, 30, 52)], [7], seed=2)  # one instance: pasted whole
    out = copy_paste([target, source], (1.0, 1.0), 0.5, np.random.default_rng(0))[0]

    inst = out["instances"]
    assert inst.gt_classes.tolist() == [0, 1, 7]
    pasted = inst.gt_masks.tensor[-1]
    assert _tight_box(pasted) == [30.0, 20.0, 52.0, 35.0]
    assert torch.equal(out["image"][:, 20:35, 30:52], source["image"][:, 20:35, 30:52])
    assert torch.equal(out["image"][:, ~pasted], target["image"][:, ~pasted])
    old = target["instances"].gt_masks.tensor
    assert torch.equal(inst.gt_masks.tensor[0], old[0] & ~pasted)
    assert torch.equal(inst.gt_masks.tensor[1], old[1])


@pytest.mark.parametrize("seed", range(6))
def test_boxes_match_masks_and_pasted_counts_stay_in_bounds(seed):
    batch = _random_batch(seed)
    out = copy_paste(batch, (0.3, 1.0), 0.5, np.random.default_rng(seed))
    assert len(out) == len(batch)
    assert any(d is not batch[b] for b, d in enumerate(out))  # something was pasted
    for b, d in enumerate(out):
        inst = d["instances"]
        assert inst.image_size == tuple(d["image"].shape[-2:]) == tuple(batch[b]["image"].shape[-2:])
        masks = inst.gt_masks.tensor
        assert masks.flatten(1).any(1).all()  # no empty mask survives
        assert inst.gt_boxes.tensor.tolist() == [_tight_box(m) for m in masks]
        origin = (inst.gt_classes // 10).tolist()
        foreign = [o for o in origin if o != b]
        if d is batch[b]:  # every chosen object was refused: the image is untouched
            assert not foreign
            continue
        assert len(set(foreign)) == 1  # every pasted object comes from one other image
        n_source = len(batch[foreign[0]]["instances"])
        assert (len(foreign) == 1) if n_source == 1 else (1 <= len(foreign) <= n_source - 1)
        assert origin == sorted(origin, key=lambda o: o != b)  # existing instances first, then the pasted


@pytest.mark.parametrize("source_hw", [(40, 60), (96, 128), (300, 200)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 1.0])
def test_a_pasted_object_is_a_fixed_fraction_of_the_target_image(source_hw, ratio):
    # The object fills the left half of its source image, whatever that image's size; on a 120x200 target
    # it becomes ratio x the target's height by ratio x half the target's width.
    sh, sw = source_hw
    target = _item(120, 200, [(118, 120, 198, 200)], [0], seed=5)
    source = _item(sh, sw, [(0, sh, 0, sw // 2)], [1], seed=6)
    for seed in range(3):
        inst = copy_paste([target, source], (ratio, ratio), 0.5, np.random.default_rng(seed))[0]["instances"]
        x0, y0, x1, y1 = inst.gt_boxes.tensor[-1].tolist()
        assert y1 - y0 == int(ratio * 120)
        assert abs((x1 - x0) - ratio * 100) <= 1


def test_scale_source_resizes_the_whole_image_to_the_target_ratio():
    image = torch.arange(3 * 50 * 70, dtype=torch.float32).reshape(3, 50, 70).remainder(256).to(torch.uint8)
    masks = torch.zeros(2, 50, 70, dtype=torch.bool)
    masks[0, 10:20, 0:35] = True
    patch_image, patch_masks = scale_source(image, masks, 0.5, (90, 61))
    assert patch_image.shape == (3, 45, 30) and patch_masks.shape == (2, 45, 30)
    assert not patch_masks[1].any() and patch_masks[0, 9:18, 0:15].all() and patch_masks[0].sum() == 9 * 15
    with pytest.raises(ValueError, match="ratio"):
        scale_source(image, masks, 1.2, (90, 61))


@pytest.mark.parametrize("ratio_range", [(0.5, 0.5), (0.3, 0.45), (0.8, 1.0)])
def test_pasted_area_scales_with_the_square_of_the_ratio(ratio_range):
    # The source object covers 40x60 of a 100x120 source (a fifth); pasted onto a 50x60 target at ratio r
    # it covers r^2 of a fifth of the target.
    low, high = ratio_range
    for seed in range(5):
        target = _item(50, 60, [(0, 4, 0, 4)], [0], seed=5)
        source = _item(100, 120, [(10, 50, 20, 80)], [1], seed=6)
        inst = copy_paste([target, source], ratio_range, 0.5, np.random.default_rng(seed))[0]["instances"]
        scale = inst.gt_masks.tensor[-1].sum().item() / (50 * 60 / 5)
        assert low**2 * 0.9 <= scale <= high**2 * 1.1, (seed, scale)
    if low == high:  # one ratio: the object becomes exactly 10x15
        assert scale == 0.25


def test_a_batch_of_one_is_unchanged():
    batch = [_item(32, 48, [(2, 20, 3, 30)], [0], seed=7)]
    before = _snapshot(batch)
    out = copy_paste(batch, (0.3, 1.0), 0.5, np.random.default_rng(0))
    assert len(out) == 1 and out[0] is batch[0]
    assert _same(_snapshot(out), before)


def test_deterministic_under_a_seeded_generator_and_inputs_untouched():
    batch = _random_batch(11)
    before = _snapshot(batch)
    first, again, other = (copy_paste(batch, (0.3, 1.0), 0.5, np.random.default_rng(s)) for s in (3, 3, 4))
    assert _same(_snapshot(first), _snapshot(again))
    assert not _same(_snapshot(first), _snapshot(other))
    assert _same(_snapshot(batch), before)


def test_loader_wrapper_applies_copy_paste_to_every_batch():
    batches = [_random_batch(s) for s in (20, 21)]
    wrapped = CopyPasteLoader(batches, (0.5, 1.0), 0.5, np.random.default_rng(9))
    assert len(wrapped) == 2
    rng = np.random.default_rng(9)
    for got, batch in zip(wrapped, batches, strict=True):
        want = copy_paste(batch, (0.5, 1.0), 0.5, rng)
        assert _same(_snapshot(got), _snapshot(want))
        assert not _same(_snapshot(got), _snapshot(batch))

    cfg = get_cfg()
    add_cutler_config(cfg)
    assert CopyPasteLoader.from_config(cfg, batches, np.random.default_rng(0)) is batches  # disabled
    cfg.INPUT.COPY_PASTE.ENABLED = True
    loader = CopyPasteLoader.from_config(cfg, batches, np.random.default_rng(0))
    assert loader.ratio_range == (0.3, 1.0) and loader.max_occlusion == 0.5
    with pytest.raises(ValueError, match="ratio_range"):
        CopyPasteLoader(batches, (0.5, 1.5), 0.5, np.random.default_rng(0))


def test_polygon_masks_are_refused():
    batch = [_item(32, 48, [(2, 20, 3, 30)], [0], seed=8), _item(32, 48, [(2, 20, 3, 30)], [1], seed=9)]
    batch[1]["instances"].gt_masks = PolygonMasks([[np.array([3.0, 2.0, 30.0, 2.0, 30.0, 20.0])]])
    batch[1]["instances"].gt_boxes = Boxes(torch.tensor([[3.0, 2.0, 30.0, 20.0]]))
    with pytest.raises(TypeError, match="bitmask"):
        copy_paste(batch, (0.3, 1.0), 0.5, np.random.default_rng(0))
