"""The photos set's assembly (tools/photos_data.py) on images made here: no downloads."""

import json

import numpy as np
import pytest
from PIL import Image

from tools.demo_data import Photo, check_coco
from tools.photos_data import OPENCV_PHOTOS, BoxPhoto, build_photos, validate, video_frames


def test_photos_with_polygons_or_boxes_become_one_valid_coco_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((600, 1280, 3), 90, np.uint8)).save(src / "wide.png")
    Image.fromarray(np.full((300, 400, 3), 150, np.uint8)).save(src / "small.jpg")
    Image.fromarray(np.full((50, 60), 30, np.uint8)).save(src / "gray.png")  # grayscale: written as RGB
    square = [[100.0, 100.0], [300.0, 100.0], [300.0, 300.0], [100.0, 300.0]]
    photos = [
        Photo("wide", src / "wide.png", "made:wide", (("cup", [square]),), (1280, 600)),
        BoxPhoto("small", src / "small.jpg", "made:small", (("car", [390.0, 10.0, 50.0, 20.0]),), (400, 300)),
        Photo("gray", src / "gray.png", "made:gray", ()),
    ]
    out = tmp_path / "photos"
    data = build_photos(photos, out)
    check_coco(data, out / "images")
    (out / "annotations.json").write_text(json.dumps(data))
    validate(out / "annotations.json")
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in data["images"]}
    assert sizes == {"wide.jpg": (640, 300), "small.jpg": (400, 300), "gray.jpg": (60, 50)}
    with Image.open(out / "images" / "gray.jpg") as im:
        assert im.mode == "RGB"
    polygon, box = data["annotations"]
    assert polygon["bbox"] == pytest.approx([50, 50, 100, 100]) and "segmentation" in polygon
    # a box-only object: no mask, its box clipped to the image (the source box ran 40 px past the edge)
    assert "segmentation" not in box and box["bbox"] == [390.0, 10.0, 10.0, 20.0] and box["area"] == 200.0
    assert {c["name"] for c in data["categories"]} == {"cup", "car"}


def test_a_wrong_stated_size_or_a_repeated_name_is_refused(tmp_path):
    from tools.demo_data import DemoDataError

    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(DemoDataError, match="40x30"):
        build_photos([BoxPhoto("a", tmp_path / "a.png", "made", (), (41, 30))], tmp_path / "out")
    twice = [Photo("a", tmp_path / "a.png", "made", ()), Photo("a", tmp_path / "a.png", "made", ())]
    with pytest.raises(DemoDataError, match="share a name"):
        build_photos(twice, tmp_path / "out")


def test_every_nth_video_frame_is_kept(tmp_path):
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(7):
        writer.write(np.full((24, 32, 3), 30 * i, np.uint8))
    writer.release()
    frames = video_frames(path, 3, tmp_path / "frames")
    assert [f.name for f in frames] == ["clip_0000.png", "clip_0003.png", "clip_0006.png"]
    assert abs(int(np.asarray(Image.open(frames[1])).mean()) - 90) <= 3


def test_the_opencv_selection_has_no_duplicates():
    assert len(OPENCV_PHOTOS) == len(set(OPENCV_PHOTOS)) == 45  # as the module docstring says
