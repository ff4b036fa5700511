"""CorLoc on hand-made boxes, and ground truth as the protocols read it."""

import json

import numpy as np
import pytest
from PIL import Image

from stages.data.base import DatasetConfig
from stages.data.datasets import DatasetError, ground_truth_boxes, list_images
from stages.evaluation.corloc import corloc


def test_corloc_is_the_exact_fraction_of_hits():
    gt = {
        "a": np.array([[0, 0, 10, 10], [50, 50, 60, 60]]),
        "b": np.array([[0, 0, 10, 10]]),
        "c": np.array([[0, 0, 10, 10]]),
        "d": np.array([[0, 0, 100, 100]]),
        "e": np.zeros((0, 4)),  # no ground truth: not counted
        "f": np.array([[0, 0, 10, 10]]),  # not in the predictions at all (an unreadable image): a miss
    }
    pred = {
        "a": np.array([50, 50, 60, 61]),  # IoU 10/11 with the second box: hit
        "b": np.array([0, 0, 10, 20]),  # IoU exactly 0.5: hit
        "c": np.array([0, 0, 10, 21]),  # IoU 10/21 < 0.5: miss
        "d": None,  # nothing found: miss
        "e": np.array([0, 0, 1, 1]),
    }
    assert corloc(pred, gt) == {"corloc": 0.4, "hits": 2, "images": 5, "absent": 1}


def voc(tmp_path):
    root = tmp_path / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n")
    for name, boxes in {"000005": [(1, 1, 100, 50)], "000007": [(10, 20, 30, 40), (5, 5, 9, 9)]}.items():
        objs = "".join(
            f"<object><name>x</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
            "</bndbox></object>"
            for a, b, c, d in boxes
        )
        (root / "Annotations" / f"{name}.xml").write_text(f"<annotation>{objs}</annotation>")
        Image.fromarray(np.zeros((60, 120, 3), np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
    return DatasetConfig(
        name="voc07", kind="voc", root=str(root), annotations=None, split="trainval", evaluate_on="all"
    )


def test_voc_boxes_lose_one_on_the_top_left(tmp_path):
    cfg = voc(tmp_path)
    assert [r.file_name for r in list_images(cfg)] == ["JPEGImages/000005.jpg", "JPEGImages/000007.jpg"]
    gt = ground_truth_boxes(cfg)
    assert gt["JPEGImages/000005.jpg"].tolist() == [[0, 0, 100, 50]]
    assert gt["JPEGImages/000007.jpg"].tolist() == [[9, 19, 30, 40], [4, 4, 9, 9]]


def test_coco20k_keeps_listed_images_and_drops_crowd_boxes(tmp_path):
    coco = {
        "images": [
            {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 9, "height": 9} for i in (1, 2, 3)
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 0},
            {"id": 2, "image_id": 1, "bbox": [0, 0, 9, 9], "iscrowd": 1},
            {"id": 3, "image_id": 3, "bbox": [0, 0, 2, 2], "iscrowd": 0},
            {"id": 4, "image_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 0},  # not in the 20k list
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    (tmp_path / "list.txt").write_text(
        "train2014/COCO_train2014_000000000001.jpg\nCOCO_train2014_000000000003.jpg\n"
    )
    (tmp_path / "images").mkdir()
    cfg = DatasetConfig(
        "coco20k",
        "coco20k",
        str(tmp_path / "images"),
        str(tmp_path / "ann.json"),
        str(tmp_path / "list.txt"),
        "all",
    )
    assert [r.id for r in list_images(cfg)] == [1, 3]
    gt = ground_truth_boxes(cfg)
    assert gt["COCO_train2014_000000000001.jpg"].tolist() == [[1, 2, 4, 6]]
    assert set(gt) == {"COCO_train2014_000000000001.jpg", "COCO_train2014_000000000003.jpg"}


def test_image_folder_is_recursive_and_sorted(tmp_path):
    for name in ("b.JPG", "a/c.webp", "a/d.png", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    cfg = DatasetConfig("f", "imagefolder", str(tmp_path), None, None, "all")
    assert [(r.id, r.file_name) for r in list_images(cfg)] == [(1, "a/c.webp"), (2, "a/d.png"), (3, "b.JPG")]
    with pytest.raises(DatasetError, match=r"dataset 'f' \(imagefolder\) has no ground truth"):
        ground_truth_boxes(cfg)


def test_a_detectors_corloc_box_is_its_best_scored_regressed_box():
    from pipeline.evaluate import top1_boxes

    predictions = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 1, "score": 0.3, "bbox": [0, 0, 5, 5], "det_bbox": [0, 0, 6, 6]},
            {"image_id": 1, "score": 0.9, "bbox": [10, 20, 5, 5], "det_bbox": [11, 21, 4, 6]},
            {"image_id": 1, "score": 0.5, "bbox": [30, 30, 5, 5], "det_bbox": [30, 30, 5, 5]},
        ],
    }
    boxes = top1_boxes(predictions)
    assert boxes["a.jpg"].tolist() == [11, 21, 15, 27]  # xyxy of the 0.9 detection's own (regressed) box
    assert boxes["b.jpg"] is None  # no detection: a miss for CorLoc


def test_a_ground_truth_size_other_than_the_files_is_warned_about(capsys):
    from pipeline.evaluate import warn_size_mismatches

    read = [{"file_name": f"{i}.jpg", "width": 600, "height": 400} for i in range(5)]
    declared = [
        {"file_name": "0.jpg", "width": 600, "height": 400},  # right
        {"file_name": "1.jpg", "width": 400, "height": 600},  # swapped
        {"file_name": "2.jpg", "width": 300, "height": 200},  # another scale
        {"file_name": "3.jpg"},  # no size declared: nothing to compare
        {"file_name": "9.jpg", "width": 1, "height": 1},  # not read (failed): not compared
    ]
    warn_size_mismatches(declared, read, "gt.json")
    assert capsys.readouterr().err == (
        "warning: 2 image(s) of the ground truth (gt.json) declare a width x height other than their file's: "
        "1.jpg 400x600, file 600x400; 2.jpg 300x200, file 600x400. Boxes are scored in the files' pixels: "
        "check the annotation file.\n"
    )
    warn_size_mismatches(declared[:1], read, "gt.json")
    assert capsys.readouterr().err == ""


def test_annotated_images_a_run_has_no_entry_for_are_named():
    from pipeline.evaluate import absent_files

    gt = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2, 3, 4)],
        "annotations": [{"id": 1, "image_id": 1}, {"id": 2, "image_id": 3}, {"id": 3, "image_id": 4}],
    }
    labels = {"images": [{"id": 7, "file_name": "1.jpg"}, {"id": 8, "file_name": "2.jpg"}]}
    assert absent_files(labels, gt) == ["3.jpg", "4.jpg"]  # 2.jpg has no annotation: not counted anyway
