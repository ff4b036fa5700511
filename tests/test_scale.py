"""The main job at real size: counts past 255 (numpy 2 and pycocotools), a 1,000-image pseudo-label run that
merges, validates and evaluates, a self-training label merge of thousands of predictions, shard names past
99,999, track ids past 255."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.driver import ShardedStage
from pipeline.evaluate import eval_corloc
from pipeline.pseudolabels import run
from pipeline.selftrain import relabel
from stages.common import rle
from stages.common.export import CocoError, CocoWriter, coco_file, mask_annotation, validate_coco, write_coco
from stages.evaluation.coco_ap import evaluate_ap, ground_truth_as_detections
from stages.video.ba import resize_ids
from tests.synthetic import object_image


def square(size: tuple[int, int], y: int, x: int, side: int) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[y : y + side, x : x + side] = True
    return mask


def many_masks(n: int, size=(60, 80), seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [square(size, *rng.integers(0, 40, 2), int(rng.integers(1, 20))) for _ in range(n)]


def test_rle_calls_agree_with_the_masks_past_255():
    masks = many_masks(1000)
    rles = [rle.encode(m) for m in masks]
    assert rle.area(rles).tolist() == [int(m.sum()) for m in masks]  # pycocotools alone fails from 256 on
    boxes = rle.to_bbox(rles)
    ys, xs = np.nonzero(masks[300])
    assert boxes[300].tolist() == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    iou = rle.iou(rles[:300], rles[:300])
    assert iou.shape == (300, 300) and np.allclose(np.diag(iou), 1.0)
    assert np.array_equal(rle.decode(rle.merge(rles[:300])), np.any(masks[:300], axis=0))


def test_a_coco_file_of_300_masks_validates_and_round_trips(tmp_path):
    # The crash of issue 9: validating >= 256 masks died in pycocotools' area().
    images = [{"id": i, "file_name": f"{i}.png", "height": 60, "width": 80} for i in range(1, 101)]
    anns = [mask_annotation(m, 1 + k % 100) for k, m in enumerate(many_masks(300))]
    write_coco(tmp_path / "a.json", coco_file(images, anns))
    data = json.loads((tmp_path / "a.json").read_text())
    assert len(data["annotations"]) == 300 and [a["id"] for a in data["annotations"]] == list(range(1, 301))


def test_streamed_coco_is_byte_identical_to_the_whole_and_checks_ids_across_pieces(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 60, "width": 80} for i in range(1, 7)]
    pieces = [images[:2], images[2:3], images[3:]]
    masks = iter(many_masks(12))
    annotations = [
        [mask_annotation(next(masks), im["id"]) for im in piece for _ in range(2)] for piece in pieces
    ]
    with CocoWriter(tmp_path / "streamed.json") as coco:
        for piece, anns in zip(pieces, annotations, strict=True):
            coco.add(piece, anns)
        assert not (tmp_path / "streamed.json").exists()  # only commit makes the file appear
        coco.commit()
    write_coco(tmp_path / "whole.json", coco_file(images, [a for anns in annotations for a in anns]))
    assert (tmp_path / "streamed.json").read_bytes() == (tmp_path / "whole.json").read_bytes()
    with CocoWriter(tmp_path / "bad.json") as coco, pytest.raises(CocoError, match="duplicate image id 2"):
        coco.add(images[:2], [])
        coco.add(images[1:3], [])
    with CocoWriter(tmp_path / "bad.json") as coco, pytest.raises(CocoError, match="unknown image_id 3"):
        coco.add(images[:2], annotations[1])
    assert not (tmp_path / "bad.json").exists() and not list(tmp_path.glob(".*tmp"))


def test_track_ids_past_255_survive_resizing():
    ids = np.arange(300).reshape(15, 20)
    big = resize_ids(ids, 60, 80)
    assert big.dtype == np.int64 and np.array_equal(big, ids.repeat(4, axis=0).repeat(4, axis=1))


def test_shard_names_stay_unique_past_99999():
    stage = ShardedStage("x", [[1]] * 100_001, factory=None, shard_dir=Path("s"))
    names = [stage.shard_file(i).name for i in (9_999, 99_999, 100_000)]
    assert names == ["shard-09999.json", "shard-99999.json", "shard-100000.json"]


def test_self_training_merge_of_6000_predictions_keeps_the_right_labels(tmp_path):
    # 200 images of 48x48: three old masks each; 30 predictions each, 10 above the threshold. One kept
    # prediction is exactly old mask 0 (which is then replaced); a dropped one is exactly old mask 1 (which
    # stays). The other kept predictions are 2x2 squares away from the old masks.
    size, n_images = (48, 48), 200
    images = [{"id": i, "file_name": f"{i}.png", "height": 48, "width": 48} for i in range(1, n_images + 1)]
    old_masks = [square(size, 0, 0, 8), square(size, 20, 20, 8), square(size, 40, 40, 8)]
    previous = coco_file(images, [mask_annotation(m, im["id"]) for im in images for m in old_masks])
    predictions = {"images": images, "annotations": []}
    for im in images:
        kept = [old_masks[0]] + [square(size, 12, 4 * k, 2) for k in range(9)]
        dropped = [old_masks[1]] + [square(size, 30, 2 * k, 2) for k in range(19)]
        for mask, score in [(m, 0.9) for m in kept] + [(m, 0.5) for m in dropped]:
            ann = mask_annotation(mask, im["id"], score)
            predictions["annotations"].append({**ann, "det_bbox": ann["bbox"]})
    assert len(predictions["annotations"]) == 6000
    labels, stats = relabel(previous, predictions, 0.7, 0.5)
    assert stats == {"predictions_kept": 2000, "previous_kept": 400, "threshold": 0.7}
    write_coco(tmp_path / "labels.json", labels)  # validated: 2,400 masks
    by_image = {}
    for a in labels["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    first = by_image[1]
    assert len(first) == 12 and [a.get("score") for a in first] == [0.9] * 10 + [None, None]
    assert [rle.decode(a["segmentation"]).sum() for a in first[10:]] == [64, 64]  # old masks 1 and 2
    assert len({a["id"] for a in labels["annotations"]}) == 2400


# ----------------------------------------------------------------------------------------------------------
# 1,000 images end to end


@pytest.fixture(scope="module")
def thousand_images(tmp_path_factory):
    """1,000 64x64 images, each with one bright square, as a COCO dataset (ground truth = the squares)."""
    root = tmp_path_factory.mktemp("thousand")
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, 1001):
        side = int(rng.integers(20, 33))
        y, x = (int(v) for v in rng.integers(0, 64 - side, 2))
        name = f"img{i:04d}.png"
        Image.fromarray(object_image(64, 64, (y, x, y + side, x + side), seed=i)).save(root / name)
        images.append({"id": i, "file_name": name, "height": 64, "width": 64})
        anns.append(mask_annotation(square((64, 64), y, x, side), i))
    gt = coco_file(images, anns)
    (root / "annotations.json").write_text(json.dumps(gt))
    return root, gt


@pytest.mark.usefixtures("ray_local")
def test_a_1000_image_run_merges_validates_and_evaluates(thousand_images, tmp_path):
    root, gt = thousand_images
    cfg = load_config(
        "coco",
        "tokencut",
        [
            f"dataset.root={root}",
            f"dataset.annotations={root / 'annotations.json'}",
            f"run.out_dir={tmp_path}",
            "run.workers=2",
            "run.overlays=2",
            "backbone.arch=test_vit_tiny",
            "backbone.random_init=true",
            "method.refine=none",  # one mask per image, exactly
        ],
    )
    path = run(cfg)
    data = json.loads(path.read_text())
    validate_coco(data)
    assert [im["id"] for im in data["images"]] == list(range(1, 1001))
    assert len(data["annotations"]) == 1000  # TokenCut: one mask per image
    assert [a["id"] for a in data["annotations"]] == list(range(1, 1001))
    summary = json.loads((path.parent / "summary.json").read_text())
    assert (summary["images"], summary["labelled"], summary["failed"], summary["annotations"]) == (
        1000,
        1000,
        0,
        1000,
    )
    assert len(list((path.parent / "shards").glob("shard-*.json"))) == 63  # 16 images per shard

    result = eval_corloc(cfg)
    assert result["images"] == 1000 and result["corloc"] == result["hits"] / 1000
    assert result["hits"] > 900  # the planted squares are found (random ViT weights: pixels decide)
    # AP over 1,000 images: the ground truth against itself is perfect; the pseudo-labels score high at 50%.
    perfect = evaluate_ap(gt, ground_truth_as_detections(gt), max_dets=100)
    assert perfect["bbox"]["AP"] == 1.0 and perfect["segm"]["AP"] == 1.0
    dets = [{**a, "score": 1.0} for a in data["annotations"]]
    ap = evaluate_ap(gt, dets, max_dets=100)
    assert ap["bbox"]["AP50"] > 0.8 and ap["segm"]["AP50"] > 0.8  # patch-grid masks of the squares
