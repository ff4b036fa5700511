"""One image decoder: high-bit-depth images scaled by their bit depth, and every odd file mode read the
same by every stage (discovery, BA, detector training with copy-paste, relabelling/evaluation, the
detector API)."""

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from stages import detect as det
from stages import pseudolabels as discover
from stages.common.export import coco_file, mask_annotation
from stages.common.io import ORIENTATION, BadImage, as_rgb, image_size, load_rgb, to_8_bit
from stages.data.datasets import ImageRecord
from stages.data.videos import VideoRecord
from stages.pseudolabels import ImageObjects
from tests.synthetic import object_image

HEIGHT, WIDTH = 48, 64  # not square: a lost EXIF rotation shows in the shape


BOX = (4, 6, 28, 30)  # y0, x0, y1, x1: off centre, so a wrong turn or flip moves it


def base_image() -> np.ndarray:
    return object_image(HEIGHT, WIDTH, BOX)


def grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _exif_rotated(path: Path, rgb: np.ndarray) -> None:
    # Stored sideways; EXIF orientation 6 (turn 90 degrees clockwise to view) shows it upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)


def write_odd_files(folder: Path) -> dict[str, Path]:
    """One file per odd mode, all showing base_image()."""
    rgb = base_image()
    g = grey(rgb)
    files = {
        "exif-rotated.jpg": lambda p: _exif_rotated(p, rgb),
        "16-bit.png": lambda p: Image.fromarray(g.astype(np.uint16) * 257).save(p),
        "12-bit.png": lambda p: Image.fromarray(np.round(g * (4095 / 255)).astype(np.uint16)).save(p),
        "12-bit-colour.png": lambda p: cv2.imwrite(
            str(p), np.round(rgb[:, :, ::-1] * (4095 / 255)).astype(np.uint16)
        ),
        "12-bit.tif": lambda p: Image.fromarray(np.round(g * (4095 / 255)).astype(np.uint16)).save(p),
        "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p),
        "palette.png": lambda p: Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(p),
        "rgba.png": lambda p: Image.fromarray(
            np.dstack([rgb, np.arange(WIDTH, dtype=np.uint8)[None].repeat(HEIGHT, 0)])
        ).save(p),
        "grey.png": lambda p: Image.fromarray(g).save(p),
        "animated.gif": lambda p: Image.fromarray(rgb).save(
            p, save_all=True, append_images=[Image.fromarray(255 - rgb)]
        ),
        "bitmap.bmp": lambda p: Image.fromarray(rgb).save(p),
    }
    paths = {}
    for name, write in files.items():
        paths[name] = folder / name
        write(paths[name])
    return paths


def test_bit_depth_rule():
    # Integer data: / (2**b - 1), b the smallest even bit count >= 8 holding the maximum.
    assert to_8_bit(np.array([0, 4095], np.uint16)).tolist() == [0, 255]  # 12-bit
    assert to_8_bit(np.array([0, 4096], np.uint16)).tolist() == [0, 64]  # 14-bit: 4096 / 16383 * 255
    assert to_8_bit(np.array([0, 1023], np.uint16)).tolist() == [0, 255]  # 10-bit
    assert to_8_bit(np.array([0, 65535], np.uint16)).tolist() == [0, 255]  # full 16-bit
    assert to_8_bit(np.array([0, 200], np.uint16)).tolist() == [0, 200]  # 8-bit data in a 16-bit file
    assert to_8_bit(np.array([-5, 100], np.int32)).tolist() == [0, 100]
    assert to_8_bit(np.array([0.0, 0.5, 1.0], np.float32)).tolist() == [0, 128, 255]
    assert to_8_bit(np.array([0.0, 50.0], np.float32)).tolist() == [0, 255]


def test_12_bit_images_are_not_dark(tmp_path):
    paths = write_odd_files(tmp_path)
    g = grey(base_image())
    for name in ("12-bit.png", "12-bit.tif", "16-bit.png"):
        out = load_rgb(paths[name])
        assert np.abs(out[:, :, 0].astype(int) - g).max() <= 1, name  # the grey image back, not 1/16 of it
    colour = load_rgb(paths["12-bit-colour.png"])
    assert np.abs(colour.astype(int) - base_image()).max() <= 1  # Pillow alone would keep the top byte
    upright = load_rgb(paths["exif-rotated.jpg"])
    assert upright.shape == (HEIGHT, WIDTH, 3) and image_size(paths["exif-rotated.jpg"]) == (HEIGHT, WIDTH)
    y0, x0, y1, x1 = BOX
    inside = np.zeros((HEIGHT, WIDTH), bool)
    inside[y0:y1, x0:x1] = True
    assert upright[inside, 0].mean() > 150 and upright[~inside, 0].mean() < 80  # the red box where it was


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow(tmp_path, orientation):
    from PIL import ImageOps

    rgb = object_image(30, 50, (3, 4, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(tmp_path / "o.png", exif=exif)  # lossless, so pixels compare exactly
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")).convert("RGB"))
    assert np.array_equal(load_rgb(tmp_path / "o.png"), expected)
    assert image_size(tmp_path / "o.png") == expected.shape[:2]
    assert (orientation in ORIENTATION) == (orientation != 1)


# ----------------------------------------------------------------------------------------------------------
# Every stage's reading path


class CapturingDiscoverer:
    """Stands in for the model: records the images the discovery stage hands it."""

    def __init__(self):
        self.seen = []

    def check(self, rgb):
        pass

    def __call__(self, images, batch_size):
        self.seen += images
        return [ImageObjects([], []) for _ in images]


class CapturingVideoDiscoverer:
    def __init__(self):
        self.seen = []

    def __call__(self, frames):
        self.seen += frames
        return np.zeros((len(frames), *frames[0].shape[:2]), np.int64)


class CapturingPredictor:
    """Stands in for detectron2's DefaultPredictor, which takes BGR."""

    def __init__(self):
        self.seen = []

    def __call__(self, bgr):
        from detectron2.structures import Boxes, Instances

        self.seen.append(np.ascontiguousarray(bgr[:, :, ::-1]))
        inst = Instances(bgr.shape[:2], pred_boxes=Boxes(np.zeros((0, 4), np.float32)))
        inst.scores = np.zeros(0, np.float32)
        inst.pred_masks = np.zeros((0, *bgr.shape[:2]), bool)
        return {"instances": _Cpu(inst)}


class _Cpu:
    def __init__(self, inst):
        self.inst = inst

    def to(self, device):
        import torch

        inst = self.inst
        inst.scores = torch.as_tensor(inst.scores)
        inst.pred_masks = torch.as_tensor(inst.pred_masks)
        return inst


def training_images(tmp_path: Path, paths: dict[str, Path]) -> dict[str, np.ndarray]:
    """What detectron2's training loader (our mapper, copy-paste wrapper) yields for each file."""
    from stages.detection import train
    from stages.detection.detectron_config import cutler_cfg

    shapes = {name: load_rgb(p).shape[:2] for name, p in paths.items()}
    images = [
        {"id": i + 1, "file_name": name, "height": h, "width": w}
        for i, (name, (h, w)) in enumerate(shapes.items())
    ]
    masks = [np.zeros(shapes[name], bool) for name in paths]
    for m in masks:
        m[5:20, 5:30] = True
    labels = tmp_path / "labels.json"
    from stages.common.export import write_coco

    write_coco(labels, coco_file(images, [mask_annotation(m, i + 1) for i, m in enumerate(masks)]))
    train.register_labels("odd-modes", labels, str(tmp_path))
    cfg = cutler_cfg()
    cfg.merge_from_file(str(train.DETECTRON_CONFIGS / "cascade_mask_rcnn_R_50_FPN.yaml"))
    cfg.DATASETS.TRAIN = ("odd-modes",)
    # Identity augmentation (the short side is already 48) and one image per batch: copy-paste then leaves
    # the batch as it is, so the loader's pixels are the decoder's.
    cfg.INPUT.MIN_SIZE_TRAIN = (HEIGHT,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.SOLVER.IMS_PER_BATCH = 1
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 0
    assert cfg.INPUT.COPY_PASTE.ENABLED  # the copy-paste loader is on the path
    out = {}
    loader = iter(train.train_loader(cfg))
    for _ in paths:  # one epoch: every image once, in shuffled order
        (item,) = next(loader)
        out[Path(item["file_name"]).name] = item["image"].permute(1, 2, 0).numpy()
    return out


@pytest.fixture(scope="module")
def stage_views(tmp_path_factory):
    """name -> {stage: the (H, W, 3) uint8 RGB array that stage decoded from the file}."""
    tmp_path = tmp_path_factory.mktemp("odd")
    paths = write_odd_files(tmp_path)
    views = {name: {"load_rgb": load_rgb(p)} for name, p in paths.items()}
    for name, p in paths.items():
        record = ImageRecord(1, name, str(p))
        d = CapturingDiscoverer()
        discover.run_shard(d, [record], 1)
        views[name]["discovery"] = d.seen[0]
        v = CapturingVideoDiscoverer()
        discover.run_video(v, VideoRecord(1, "clip", (name,), str(tmp_path)), overlay=False)
        views[name]["ba"] = v.seen[0]
        detector = det.Detector.__new__(det.Detector)  # the detector API around a stand-in model
        detector.predictor = CapturingPredictor()
        det.run_shard(detector, [record])  # relabelling and evaluation
        detector(p)  # the API called on a file
        views[name]["relabel/eval"], views[name]["detector api"] = detector.predictor.seen
    for name, image in training_images(tmp_path, paths).items():
        views[name]["training"] = image
    return paths, views


ODD = [
    "exif-rotated.jpg",
    "16-bit.png",
    "12-bit.png",
    "12-bit-colour.png",
    "12-bit.tif",
    "cmyk.jpg",
    "palette.png",
    "rgba.png",
    "grey.png",
    "animated.gif",
    "bitmap.bmp",
]


@pytest.mark.parametrize("name", ODD)
def test_every_stage_reads_the_same_pixels(stage_views, name):
    _, views = stage_views
    seen = views[name]
    assert set(seen) == {"load_rgb", "discovery", "ba", "training", "relabel/eval", "detector api"}
    reference = seen["load_rgb"]
    assert reference.shape == (HEIGHT, WIDTH, 3) and reference.dtype == np.uint8
    for stage, image in seen.items():
        assert image.shape == reference.shape, stage
        assert np.array_equal(image, reference), f"{stage} decodes {name} differently"
    assert np.abs(grey(reference).astype(int) - grey(base_image())).mean() < 6  # and it is the picture


@pytest.mark.parametrize("name", [n for n in ODD if "bit" not in n or n == "bitmap.bmp"])
def test_8_bit_files_decode_as_detectron2_reads_them(stage_views, name):
    from detectron2.data.detection_utils import read_image

    paths, views = stage_views
    assert np.array_equal(read_image(str(paths[name]), format="RGB"), views[name]["load_rgb"])


def test_what_users_hand_a_detector_becomes_the_rgb_array_a_file_would(tmp_path):
    rgb = object_image(20, 30, (2, 3, 12, 20))
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(as_rgb(tmp_path / "a.png"), rgb) and np.array_equal(
        as_rgb(str(tmp_path / "a.png")), rgb
    )
    assert np.array_equal(as_rgb(rgb), rgb)
    assert np.array_equal(as_rgb(Image.fromarray(rgb)), rgb)
    assert np.array_equal(as_rgb(Image.fromarray(rgb).convert("RGBA")), rgb)  # alpha dropped
    grey = Image.fromarray(rgb).convert("L")
    assert np.array_equal(as_rgb(grey), np.repeat(np.asarray(grey)[:, :, None], 3, axis=2))
    deep = Image.fromarray(np.full((4, 5), 65535, np.uint16))  # 16-bit grey: scaled by its bit depth
    assert as_rgb(deep).dtype == np.uint8 and as_rgb(deep).shape == (4, 5, 3) and as_rgb(deep).min() == 255
    for bad, named in [
        ([rgb, rgb], "got list"),
        (rgb[:, :, 0], "got shape (20, 30)"),
        (None, "got NoneType"),
    ]:
        with pytest.raises(BadImage, match=re.escape(named)):
            as_rgb(bad)
