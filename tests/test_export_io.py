"""COCO export round-trips through pycocotools; images of any mode load as RGB; bad files are named."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from stages.common.export import CATEGORIES, CocoError, coco_file, mask_annotation, validate_coco, write_coco
from stages.common.io import BadImage, atomic_write_bytes, atomic_write_text, load_rgb
from stages.pseudolabels import ImageObjects, overlay_png


def test_coco_round_trip_keeps_size_area_and_box(tmp_path):
    height, width = 30, 50  # not square: a width/height swap would show
    mask = np.zeros((height, width), bool)
    mask[5:12, 20:44] = True
    mask[20:25, 2:4] = True
    images = [{"id": 7, "file_name": "a.jpg", "width": width, "height": height}]
    path = tmp_path / "labels.json"
    write_coco(path, coco_file(images, [mask_annotation(mask, 7), mask_annotation(mask[::-1], 7)]))
    coco = COCO(str(path))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=7))
    assert [a["id"] for a in anns] == [1, 2]
    assert np.array_equal(coco.annToMask(anns[0]), mask)
    assert anns[0]["area"] == int(mask.sum()) == 178
    assert anns[0]["bbox"] == [2.0, 5.0, 42.0, 20.0]
    assert isinstance(json.loads(path.read_text())["annotations"][0]["segmentation"]["counts"], str)
    assert coco.loadCats(1)[0]["name"] == "fg"


def test_wrong_files_are_refused_before_writing(tmp_path):
    mask = np.ones((30, 50), bool)
    swapped = [{"id": 1, "file_name": "a.jpg", "width": 30, "height": 50}]
    path = tmp_path / "labels.json"
    with pytest.raises(CocoError, match="image \\(height, width\\)"):
        write_coco(path, coco_file(swapped, [mask_annotation(mask, 1)]))
    ann = mask_annotation(mask, 1)
    ann["area"] = 5
    good = [{"id": 1, "file_name": "a.jpg", "width": 50, "height": 30}]
    with pytest.raises(CocoError, match="area"):
        write_coco(path, coco_file(good, [ann]))
    with pytest.raises(CocoError, match="unknown image_id"):
        write_coco(path, coco_file(good, [mask_annotation(mask, 2)]))
    assert not path.exists()


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "text is not bytes: the write itself fails")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16", "LA"])
def test_every_image_mode_loads_as_8_bit_rgb(tmp_path, mode):
    base = Image.fromarray(np.linspace(0, 255, 40 * 60).reshape(40, 60).astype(np.uint8))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base).astype(np.uint16) * 257)
        path = tmp_path / "img.png"
    else:
        img = base.convert(mode)
        path = tmp_path / ("img.jpg" if mode in ("L", "CMYK") else "img.png")
    img.save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (40, 60, 3) and rgb.dtype == np.uint8
    assert rgb.flags.writeable
    assert rgb.max() > 200  # 16-bit data is scaled, not clipped to white or black


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff not a jpeg", "truncated"])
def test_unreadable_and_truncated_files_raise_bad_image(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:400])
    else:
        path.write_bytes(content)
    with pytest.raises(BadImage, match="unreadable"):
        load_rgb(path)


def test_overlay_draws_boxes_of_masks_rejected_by_refinement(tmp_path):
    # Two discovery boxes, one refined mask (the other was rejected): the overlay still shows both boxes.
    rgb = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[5:15, 5:20] = True
    objects = ImageObjects(boxes=[[5, 5, 15, 10], [30, 20, 20, 15]], masks=[mask])
    drawn = np.asarray(Image.open(io.BytesIO(overlay_png(rgb, objects))))
    assert drawn.shape[:2] == (40, 60)
    assert drawn[20:35, 30:50].any()  # the second box's outline, where no mask is


def test_validation_compares_with_boxes_and_areas_written_by_hand():
    # An L-shaped mask in a 30x50 image: rows 5..11 of columns 20..43, then rows 12..19 of columns 20..23.
    mask = np.zeros((30, 50), np.uint8)
    mask[5:12, 20:44] = 1
    mask[12:20, 20:24] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    ann = {
        "id": 1,
        "image_id": 1,
        "category_id": 1,
        "iscrowd": 0,
        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        "area": 7 * 24 + 8 * 4,  # 200 pixels
        "bbox": [20.0, 5.0, 24.0, 15.0],  # x, y, width, height
    }
    images = [{"id": 1, "file_name": "a.jpg", "width": 50, "height": 30}]
    validate_coco({"images": images, "annotations": [ann], "categories": CATEGORIES})
    wrong = {
        "bbox": [
            [20.0, 5.0, 44.0, 20.0],
            [20.0, 5.0, 23.0, 14.0],
            [5.0, 20.0, 15.0, 24.0],
        ],  # xyxy, -1, swapped
        "area": [199, 24 * 15],  # one pixel off; the box's area
    }
    for key, values in wrong.items():
        for value in values:
            bad = {**ann, key: value}
            with pytest.raises(CocoError, match=key):
                validate_coco({"images": images, "annotations": [bad], "categories": CATEGORIES})
