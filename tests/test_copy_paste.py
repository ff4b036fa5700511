"""Copy-paste: occlusion, pixels, boxes, counts, scale, fitting, determinism, on batches made here."""

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from stages.copy_paste import CopyPasteLoader, boxes_from_masks, copy_paste, paste
from stages.detectron_config import add_cutler_config


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


def test_paste_occludes_existing_masks_exactly():
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    masks = torch.zeros(5, 40, 50, dtype=torch.bool)
    masks[0, 0:30, 0:30] = True  # partly covered, stays large
    masks[1, 12:16, 12:16] = True  # fully covered: dropped
    masks[2, 35:40, 40:50] = True  # far away: untouched
    masks[3, 14:18, 27:32] = True  # 20 px, loses 12 under the second pasted mask: 8 < min_area, dropped
    masks[4, 36:38, 0:2] = True  # 4 px < min_area but untouched: kept
    patch_masks = torch.zeros(2, 12, 20, dtype=torch.bool)
    patch_masks[0, 0:12, 0:10] = True
    patch_masks[1, 4:8, 6:20] = True  # overlaps the first pasted mask
    patch_image = torch.randint(0, 256, (3, 12, 20), dtype=torch.uint8)
    top, left = 10, 10

    new_image, kept_masks, keep, pasted = paste(
        image, masks, patch_image, patch_masks, top, left, min_area=16
    )

    placed = torch.zeros(2, 40, 50, dtype=torch.bool)
    placed[:, 10:22, 10:30] = patch_masks
    cover = placed.any(0)
    assert torch.equal(pasted, placed)
    assert keep.tolist() == [True, False, True, False, True]
    assert torch.equal(kept_masks, (masks & ~cover)[keep])
    assert torch.equal(new_image[:, cover], patch_image[:, patch_masks.any(0)])
    assert torch.equal(new_image[:, ~cover], image[:, ~cover])


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
        paste(image, torch.zeros(0, 20, 20, dtype=torch.bool), image[:, :8, :8], patch, 15, 0, min_area=16)


def test_pasted_object_carries_source_pixels_and_removes_target_pixels():
    target = _item(60, 80, [(5, 55, 5, 75), (0, 6, 0, 6)], [0, 1], seed=1)
    source = _item(60, 80, [(20, 35, 30, 52)], [7], seed=2)  # one instance: pasted whole, at ratio 1
    out = copy_paste([target, source], (1.0, 1.0), 16, np.random.default_rng(0))[0]

    inst = out["instances"]
    assert inst.gt_classes[-1].item() == 7
    pasted = inst.gt_masks.tensor[-1]
    x0, y0, x1, y1 = (int(v) for v in _tight_box(pasted))
    assert (y1 - y0, x1 - x0) == (15, 22)  # same size as the source object
    assert torch.equal(out["image"][:, y0:y1, x0:x1], source["image"][:, 20:35, 30:52])
    assert torch.equal(out["image"][:, ~pasted], target["image"][:, ~pasted])
    survivors = {c.item(): m for c, m in zip(inst.gt_classes[:-1], inst.gt_masks.tensor[:-1], strict=True)}
    for cls, old in zip(target["instances"].gt_classes, target["instances"].gt_masks.tensor, strict=True):
        rest = old & ~pasted
        if rest.sum() >= 16:  # enough pixels left (min_area): kept, minus exactly the pasted pixels
            assert torch.equal(survivors[cls.item()], rest)
        elif not rest.any():  # nothing left: dropped
            assert cls.item() not in survivors
    assert 0 in survivors  # the large mask keeps most of its pixels (the pasted object always overlaps it)


@pytest.mark.parametrize("seed", range(6))
def test_boxes_match_masks_and_pasted_counts_stay_in_bounds(seed):
    batch = _random_batch(seed)
    out = copy_paste(batch, (0.3, 1.0), 16, np.random.default_rng(seed))
    assert len(out) == len(batch)
    for b, d in enumerate(out):
        inst = d["instances"]
        assert inst.image_size == tuple(d["image"].shape[-2:]) == tuple(batch[b]["image"].shape[-2:])
        masks = inst.gt_masks.tensor
        assert masks.flatten(1).any(1).all()  # no empty mask survives
        assert inst.gt_boxes.tensor.tolist() == [_tight_box(m) for m in masks]
        origin = (inst.gt_classes // 10).tolist()
        foreign = [o for o in origin if o != b]
        assert len(set(foreign)) == 1  # every pasted object comes from one other image
        n_source = len(batch[foreign[0]]["instances"])
        assert (len(foreign) == 1) if n_source == 1 else (1 <= len(foreign) <= n_source - 1)
        assert origin == sorted(origin, key=lambda o: o != b)  # existing instances first, then the pasted


def test_a_fully_covered_mask_is_dropped_and_a_too_large_object_is_scaled_to_fit():
    # The source object is the whole 96x128 source image; the target is 48x96, so the object is scaled by
    # 0.5 (aspect kept) to 48x64, and wherever it lands it covers columns 32..63.
    target = _item(48, 96, [(10, 20, 35, 60), (40, 48, 0, 96)], [0, 1], seed=3)
    source = _item(96, 128, [(0, 96, 0, 128)], [5], seed=4)
    for seed in range(4):
        inst = copy_paste([target, source], (1.0, 1.0), 16, np.random.default_rng(seed))[0]["instances"]
        assert inst.gt_classes.tolist() == [1, 5]  # class 0 vanished under the pasted object
        x0, y0, x1, y1 = inst.gt_boxes.tensor[-1].tolist()
        assert (y0, y1, x1 - x0) == (0, 48, 64) and inst.gt_masks.tensor[-1].sum() == 48 * 64
        assert inst.gt_masks.tensor[0].sum() == 8 * (96 - 64)  # the wide mask keeps what is not covered


@pytest.mark.parametrize("ratio_range", [(0.5, 0.5), (0.3, 0.45), (0.8, 1.0)])
def test_pasted_area_scales_with_the_square_of_the_ratio(ratio_range):
    source_area = 40 * 60
    low, high = ratio_range
    for seed in range(5):
        target = _item(100, 120, [(0, 4, 0, 4)], [0], seed=5)
        source = _item(100, 120, [(10, 50, 20, 80)], [1], seed=6)
        inst = copy_paste([target, source], ratio_range, 16, np.random.default_rng(seed))[0]["instances"]
        scale = inst.gt_masks.tensor[-1].sum().item() / source_area
        assert low**2 * 0.9 <= scale <= high**2 * 1.1, (seed, scale)
    if low == high:  # one ratio: the 40x60 rectangle becomes exactly 20x30
        assert scale == 0.25


def test_a_batch_of_one_is_unchanged():
    batch = [_item(32, 48, [(2, 20, 3, 30)], [0], seed=7)]
    before = _snapshot(batch)
    out = copy_paste(batch, (0.3, 1.0), 16, np.random.default_rng(0))
    assert len(out) == 1 and out[0] is batch[0]
    assert _same(_snapshot(out), before)


def test_deterministic_under_a_seeded_generator_and_inputs_untouched():
    batch = _random_batch(11)
    before = _snapshot(batch)
    first, again, other = (copy_paste(batch, (0.3, 1.0), 16, np.random.default_rng(s)) for s in (3, 3, 4))
    assert _same(_snapshot(first), _snapshot(again))
    assert not _same(_snapshot(first), _snapshot(other))
    assert _same(_snapshot(batch), before)


def test_loader_wrapper_applies_copy_paste_to_every_batch():
    batches = [_random_batch(s) for s in (20, 21)]
    wrapped = CopyPasteLoader(batches, (0.5, 1.0), 16, np.random.default_rng(9))
    assert len(wrapped) == 2
    rng = np.random.default_rng(9)
    for got, batch in zip(wrapped, batches, strict=True):
        want = copy_paste(batch, (0.5, 1.0), 16, rng)
        assert _same(_snapshot(got), _snapshot(want))
        assert not _same(_snapshot(got), _snapshot(batch))

    cfg = get_cfg()
    add_cutler_config(cfg)
    assert CopyPasteLoader.from_config(cfg, batches, np.random.default_rng(0)) is batches  # disabled
    cfg.INPUT.COPY_PASTE.ENABLED = True
    loader = CopyPasteLoader.from_config(cfg, batches, np.random.default_rng(0))
    assert loader.ratio_range == (0.3, 1.0) and loader.min_area == 16


def test_polygon_masks_are_refused():
    batch = [_item(32, 48, [(2, 20, 3, 30)], [0], seed=8), _item(32, 48, [(2, 20, 3, 30)], [1], seed=9)]
    batch[1]["instances"].gt_masks = PolygonMasks([[np.array([3.0, 2.0, 30.0, 2.0, 30.0, 20.0])]])
    batch[1]["instances"].gt_boxes = Boxes(torch.tensor([[3.0, 2.0, 30.0, 20.0]]))
    with pytest.raises(TypeError, match="bitmask"):
        copy_paste(batch, (0.3, 1.0), 16, np.random.default_rng(0))
