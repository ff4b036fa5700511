"""Class-agnostic AP: the ground truth scores 1.0 against itself; misses and shifts cost what they should."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import pipeline.evaluate
from pipeline.config import load_config
from stages.common.export import mask_annotation
from stages.evaluation.coco_ap import evaluate_ap, ground_truth_as_detections
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


def rect_rle(x0, y0, x1, y1, size=100):
    m = np.zeros((size, size), np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def test_ap_and_ar_equal_the_values_computed_by_hand():
    # Ground truth written by hand: image 1 has A and B, image 2 has C (boxes x0, y0, x1, y1).
    boxes = {"A": (1, (10, 10, 40, 40)), "B": (1, (60, 60, 90, 90)), "C": (2, (20, 20, 60, 60))}
    gt = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2)],
        "annotations": [
            {
                "id": k,
                "image_id": image_id,
                "category_id": 7,
                "iscrowd": 0,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "segmentation": rect_rle(x0, y0, x1, y1),
            }
            for k, (image_id, (x0, y0, x1, y1)) in enumerate(boxes.values(), 1)
        ],
        "categories": [{"id": 7, "name": "thing"}],
    }
    # Ranked detections: A exactly (TP), a box on nothing (FP), C shifted 9 px (IoU 31/49 = 0.63: TP at
    # IoU thresholds 0.5-0.6, FP at 0.65-0.95), A again (a duplicate: FP). B is missed.
    dets = [
        (1, 0.9, (10, 10, 40, 40)),
        (2, 0.8, (70, 70, 90, 90)),
        (2, 0.7, (29, 20, 69, 60)),
        (1, 0.6, (10, 10, 40, 40)),
    ]
    detections = [
        {
            "image_id": i,
            "score": s,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "segmentation": rect_rle(x0, y0, x1, y1),
        }
        for i, s, (x0, y0, x1, y1) in dets
    ]
    # COCO's 101-point interpolated precision. At IoU 0.5-0.6 (3 thresholds): precision 1 up to recall 1/3
    # (34 recall points 0.00-0.33), 2/3 up to recall 2/3 (33 points), 0 beyond: AP = (34 + 33 * 2/3) / 101.
    # At 0.65-0.95 (7 thresholds): precision 1 up to recall 1/3 only: AP = 34 / 101. Recall: 2/3, then 1/3.
    ap_low, ap_high = 56 / 101, 34 / 101
    res = evaluate_ap(gt, detections, max_dets=100)
    for kind in ("bbox", "segm"):
        assert res[kind]["AP50"] == pytest.approx(ap_low)
        assert res[kind]["AP75"] == pytest.approx(ap_high)
        assert res[kind]["AP"] == pytest.approx((3 * ap_low + 7 * ap_high) / 10)
        assert res[kind]["AR100"] == pytest.approx((3 * 2 / 3 + 7 * 1 / 3) / 10)


def evaluate_with(predict, tmp_path, cfg, monkeypatch) -> dict:
    """evaluate_detector's metrics with ``predict`` standing in for the detector (an empty detector dir)."""
    monkeypatch.setattr(pipeline.evaluate, "predict", predict)
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model_final.pth", "config.yaml"):
        (model / name).touch()
    return pipeline.evaluate.evaluate_detector(model, cfg)


@pytest.mark.parametrize("evaluate_on, ap50", [("all", 0.5), ("annotated", 1.0)])
def test_a_set_labelled_in_part_is_scored_on_its_annotated_images(tmp_path, monkeypatch, evaluate_on, ap50):
    images = []
    for i in (1, 2, 3):
        Image.new("RGB", (100, 100)).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 100, "height": 100})
    box = [10, 10, 40, 40]  # [x, y, w, h] on image 1 only: images 2 and 3 are unlabelled, not empty
    gt = {"images": images, "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box}]}
    gt["categories"] = [{"id": 1, "name": "object"}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    cfg = load_config(
        "coco",
        "maskcut",
        [
            f"dataset.root={tmp_path}",
            f"dataset.annotations={tmp_path / 'gt.json'}",
            f"dataset.evaluate_on={evaluate_on}",
        ],
    )
    found = {"image_id": 1, "category_id": 1, "bbox": box, "det_bbox": box, "score": 0.9}
    on_unlabelled = {
        **found,
        "image_id": 2,
        "score": 0.99,
    }  # first in score order: a false positive under "all"
    calls = []

    def predict(
        model_dir, records, out_dir, max_dets, cfg
    ):  # the detector's output on the images it is run on
        calls.append((sorted(r.id for r in records), out_dir.name))
        ids = {r.id for r in records}
        return {"images": [im for im in images if im["id"] in ids],
                "annotations": [a for a in (found, on_unlabelled) if a["image_id"] in ids],
                "failures": []}  # fmt: skip

    metrics = evaluate_with(predict, tmp_path, cfg, monkeypatch)
    assert metrics["ap"]["bbox"]["AP50"] == pytest.approx(ap50)
    assert (metrics["corloc"]["hits"], metrics["corloc"]["images"]) == (1, 1)  # annotated images either way
    # The detector runs only on the scored images; the metrics say which rule scored how many.
    scored = [1, 2, 3] if evaluate_on == "all" else [1]
    assert [ids for ids, _ in calls] == [scored]
    assert calls[0][1].startswith("predictions-")  # keyed by the images: evaluate.predictions_dir
    assert (metrics["images_scored"], metrics["images"], metrics["evaluate_on"]) == (
        len(scored),
        3,
        evaluate_on,
    )
    # The ground truth is a box without a mask: no mask AP, and the output says why.
    assert "segm" not in metrics["ap"]
    assert metrics["no_mask_ap"] == "1 of the 1 ground-truth objects are boxes without masks"
    saved = json.loads((tmp_path / "model" / "eval" / "coco" / "metrics.json").read_text())
    assert saved["evaluate_on"] == evaluate_on and saved["images_scored"] == len(scored)
    head = pipeline.evaluate.format_detector_metrics(metrics).splitlines()[0]
    assert head == f"AP on {len(scored)} of the dataset's 3 images (dataset.evaluate_on={evaluate_on})"


def test_the_packaged_sets_labelled_in_part_are_scored_on_their_annotated_images():
    demo = load_config("demo", "maskcut").dataset
    gt = json.loads(Path(demo.annotations).read_text())
    annotated = {a["image_id"] for a in gt["annotations"]}
    assert 0 < len(annotated) < len(gt["images"])  # some photos labelled: the others are not empty
    assert demo.evaluate_on == "annotated"
    assert load_config("photos", "maskcut").dataset.evaluate_on == "annotated"
    assert load_config("coco", "maskcut").dataset.evaluate_on == "all"  # COCO's rule stays the default


def test_scored_images_the_detector_cannot_read_are_named(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (100, 100)).save(tmp_path / "1.png")
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2)]
    box = [10, 10, 40, 40]
    gt = {"images": images, "categories": [{"id": 1, "name": "object"}]}
    gt["annotations"] = [{"id": i, "image_id": i, "category_id": 1, "bbox": box} for i in (1, 2)]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    cfg = load_config(
        "coco", "maskcut", [f"dataset.root={tmp_path}", f"dataset.annotations={tmp_path / 'gt.json'}"]
    )
    failure = {"id": 2, "file_name": "2.png", "reason": "unreadable: no such file"}

    def predict(model_dir, records, out_dir, max_dets, cfg):  # 2.png is not on disk: the worker records it
        found = {"image_id": 1, "category_id": 1, "bbox": box, "det_bbox": box, "score": 0.9}
        return {"images": [images[0]], "annotations": [found], "failures": [failure]}

    metrics = evaluate_with(predict, tmp_path, cfg, monkeypatch)
    assert metrics["unreadable"] == ["2.png"] and metrics["corloc"]["images"] == 2
    assert capsys.readouterr().err.endswith(
        "warning: the detector could not read 1 of the 2 scored images, scored as images without detections: "
        "2.png (unreadable: no such file)\n"
    )
