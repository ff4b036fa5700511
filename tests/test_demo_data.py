"""Pure helpers of the demo-data assembly, on data made here (no network, no downloads)."""

import numpy as np
import pytest
from PIL import Image

from tools.demo_data import (
    check_coco,
    coco_annotation,
    fit_size,
    id_map,
    labelme_instances,
    link_tracks,
    polygon_mask,
    polygons_area,
    polygons_bbox,
    scale_polygon,
    size_for_height,
    voc_palette,
)


def test_fit_size_shrinks_longer_side_only_when_needed():
    assert fit_size(960, 643, 640) == (640, 429)
    assert fit_size(427, 640, 640) == (427, 640)
    assert fit_size(512, 600, 640) == (512, 600)
    assert fit_size(1210, 907, 640) == (640, 480)
    assert fit_size(600, 1280, 640) == (300, 640)


def test_size_for_height_keeps_aspect():
    assert size_for_height(1000, 563, 480) == (853, 480)
    assert size_for_height(854, 480, 480) == (854, 480)


def test_box_of_scaled_polygon_is_scaled_box():
    poly = [[148.0, 50.0], [550.0, 50.0], [550.0, 642.0], [148.0, 642.0]]
    sx, sy = 640 / 960, 429 / 643
    x, y, w, h = polygons_bbox([scale_polygon(poly, sx, sy)])
    assert (x, y) == pytest.approx((148 * sx, 50 * sy))
    assert (w, h) == pytest.approx((402 * sx, 592 * sy))


def test_bbox_and_area_cover_all_parts_of_an_instance():
    left = [[0, 0], [10, 0], [10, 10], [0, 10]]
    right = [[20, 5], [30, 5], [30, 15], [20, 15]]
    assert polygons_bbox([left, right]) == [0.0, 0.0, 30.0, 15.0]
    assert polygons_area([left, right], 40, 20) == 200


def test_labelme_groups_parts_drops_ignore_and_converts_rectangles():
    tri = [[0, 0], [4, 0], [0, 4]]
    shapes = [
        {"label": "sofa", "group_id": 0, "shape_type": "polygon", "points": tri},
        {"label": "person", "group_id": None, "shape_type": "polygon", "points": tri},
        {"label": "__ignore__", "group_id": None, "shape_type": "polygon", "points": tri},
        {"label": "sofa", "group_id": 0, "shape_type": "polygon", "points": tri},
        {"label": "person", "group_id": None, "shape_type": "polygon", "points": tri},
        {"label": "box", "group_id": None, "shape_type": "rectangle", "points": [[1, 2], [5, 7]]},
        {"label": "line", "group_id": None, "shape_type": "polygon", "points": [[0, 0], [1, 1]]},
    ]
    got = labelme_instances(shapes)
    assert [(label, len(polys)) for label, polys in got] == [
        ("sofa", 2),
        ("person", 1),
        ("person", 1),
        ("box", 1),
    ]
    assert got[3][1][0] == [[1, 2], [5, 2], [5, 7], [1, 7]]


def test_labelme_rejects_unknown_shape_types():
    with pytest.raises(ValueError, match="circle"):
        labelme_instances([{"label": "a", "shape_type": "circle", "points": [[0, 0], [1, 1]]}])


def test_coco_annotation_clips_to_image():
    ann = coco_annotation([[[-3, -2], [12, -2], [12, 9], [-3, 9]]], width=10, height=8)
    assert ann["bbox"] == [0.0, 0.0, 10.0, 8.0]
    assert ann["area"] == 80
    assert ann["iscrowd"] == 0


def test_link_tracks_follows_overlap_not_order():
    def box(x):
        return polygon_mask([[[x, 0], [x + 5, 0], [x + 5, 5], [x, 5]]], 40, 10)

    frame0 = [("truck", box(0)), ("truck", box(20)), ("car", box(30))]
    # next frame: same-label objects listed in swapped order and moved a little; a new truck appears
    frame1 = [("truck", box(21)), ("car", box(31)), ("truck", box(1)), ("truck", box(10))]
    assert link_tracks([frame0, frame1]) == [[1, 2, 3], [2, 3, 1, 4]]


def test_id_map_and_palette_png_roundtrip(tmp_path):
    a = polygon_mask([[[0, 0], [6, 0], [6, 6], [0, 6]]], 10, 8)
    b = polygon_mask([[[4, 2], [9, 2], [9, 7], [4, 7]]], 10, 8)
    ids = id_map([a, b], [1, 2], 10, 8)
    assert ids[5, 5] == 2 and ids[1, 1] == 1 and ids[0, 9] == 0  # later object covers earlier
    img = Image.fromarray(ids, mode="P")
    img.putpalette(voc_palette())
    img.save(tmp_path / "m.png")
    back = Image.open(tmp_path / "m.png")
    assert back.mode == "P"
    np.testing.assert_array_equal(np.asarray(back), ids)
    assert voc_palette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]


def test_check_coco_catches_swapped_size_and_outside_box(tmp_path):
    Image.new("RGB", (30, 20)).save(tmp_path / "a.jpg")
    good = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 30, "height": 20}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 30, 20]}],
    }
    check_coco(good, tmp_path)
    swapped = {**good, "images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 30}]}
    with pytest.raises(ValueError, match="json says"):
        check_coco(swapped, tmp_path)
    outside = {**good, "annotations": [{"id": 1, "image_id": 1, "bbox": [5, 5, 30, 10]}]}
    with pytest.raises(ValueError, match="not inside"):
        check_coco(outside, tmp_path)


def test_pip_failure_names_package_and_command(tmp_path, monkeypatch):
    import subprocess

    from tools import demo_data

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(demo_data.subprocess, "run", failing_run)
    with pytest.raises(demo_data.DemoDataError) as err:
        demo_data.fetch(demo_data.IMGAUG, tmp_path)
    assert "'imgaug'" in str(err.value) and "pip download" in str(err.value)
    assert "No matching distribution" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no scratch folder or partial file left behind
