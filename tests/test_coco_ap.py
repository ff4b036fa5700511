"""Class-agnostic AP: the ground truth scores 1.0 against itself; misses and shifts cost what they should."""

import json
from pathlib import Path

import numpy as np
import pytest

from stages.coco_ap import evaluate_ap, ground_truth_as_detections
from stages.export import mask_annotation
from tests.optional import require


def toy_gt():
    masks = {1: [(5, 5, 30, 40), (50, 10, 90, 30)], 2: [(10, 60, 70, 90)]}
    images, anns = [], []
    for image_id, boxes in masks.items():
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 100, "height": 100})
        for k, (y0, x0, y1, x1) in enumerate(boxes):
            m = np.zeros((100, 100), bool)
            m[y0:y1, x0:x1] = True
            anns.append({**mask_annotation(m, image_id), "id": len(anns) + 1, "category_id": 3 + k})
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 3, "name": "a"}, {"id": 4, "name": "b"}],
    }


def test_ground_truth_against_itself_is_perfect():
    gt = toy_gt()
    res = evaluate_ap(gt, ground_truth_as_detections(gt), max_dets=100)
    for kind in ("bbox", "segm"):
        assert res[kind]["AP"] == pytest.approx(1.0)
        assert res[kind]["AR100"] == pytest.approx(1.0)


def test_categories_do_not_matter_and_misses_cost_recall():
    gt = toy_gt()
    dets = ground_truth_as_detections(gt)[:2]  # the object of image 2 is missed
    res = evaluate_ap(gt, dets, max_dets=100)
    assert res["bbox"]["AR100"] == pytest.approx(2 / 3)
    assert res["bbox"]["AP50"] < 1.0


def test_a_box_shifted_to_iou_0_6_counts_at_50_not_at_75():
    gt = toy_gt()
    gt["annotations"] = gt["annotations"][:1]
    gt["images"] = gt["images"][:1]
    x, y, w, h = gt["annotations"][0]["bbox"]
    shift = w / 4  # IoU = 0.75w / 1.25w = 0.6
    res = evaluate_ap(gt, [{"image_id": 1, "bbox": [x + shift, y, w, h], "score": 0.9}], max_dets=100)
    assert res["bbox"]["AP50"] == pytest.approx(1.0)
    assert res["bbox"]["AP75"] == pytest.approx(0.0)


def test_demo_ground_truth_against_itself(tmp_path):
    path = Path(__file__).resolve().parent.parent / "data" / "demo" / "annotations.json"
    require(path.exists(), "demo data not assembled (make demo-data)")
    gt = json.loads(path.read_text())
    res = evaluate_ap(gt, ground_truth_as_detections(gt), max_dets=100)
    assert res["bbox"]["AP"] == pytest.approx(1.0) and res["segm"]["AP"] == pytest.approx(1.0)
