"""Bad input found by trying real files: hand-made ground truth, annotation files that are not what they
claim, odd entries in an image folder, EXIF-rotated VOC images, file modes under the umask, and errors at
the command line."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import cli
from pipeline.config import load_config
from stages.common.io import atomic_write_text
from stages.data.base import DatasetConfig
from stages.data.datasets import DatasetError, ground_truth_boxes, ground_truth_coco, list_images, scan_folder
from stages.data.videos import check_video_ground_truth, list_videos, video_ground_truth
from stages.evaluation.coco_ap import evaluate_ap, ground_truth_as_detections
from stages.evaluation.corloc import corloc
from tests.synthetic import object_image, write_davis_videos, write_image_folder

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------------
# Ground truth: one loader that fills what COCO allows to be implicit


def coco_dataset(tmp_path: Path, annotations: list[dict], images: list[dict] | None = None) -> DatasetConfig:
    """A COCO dataset of three 40x60 images under tmp_path/images, with the given annotations."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    for i in (1, 2, 3):
        Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / f"{i}.png")
    if images is None:
        images = [{"id": i, "file_name": f"{i}.png", "width": 60, "height": 40} for i in (1, 2, 3)]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return DatasetConfig("handmade", "coco", str(root), str(path), None, "all")


def coco_command(command: str, root, annotations) -> list[str]:
    """The command line of ``command`` on a hand-made COCO dataset (root, annotation file)."""
    return [command, "--dataset", "coco", f"dataset.root={root}", f"dataset.annotations={annotations}"]


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def square(y0, x0, y1, x1):
    mask = np.zeros((40, 60), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_hand_made_ground_truth_without_iscrowd_or_area_evaluates(tmp_path):
    # No iscrowd, no area, no ids, one mask without a bbox, one image without its size: all allowed.
    polygon = [[10, 5, 30, 5, 30, 25, 10, 25]]
    anns = [
        {"image_id": 1, "bbox": [10, 5, 20, 20], "segmentation": polygon},
        {"image_id": 2, "segmentation": rle_of(square(2, 3, 12, 33))},
        {"image_id": 3, "bbox": [0, 0, 8, 8], "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]]},
    ]
    images = [
        {"id": 1, "file_name": "1.png"},
        *({"id": i, "file_name": f"{i}.png", "width": 60, "height": 40} for i in (2, 3)),
    ]
    cfg = coco_dataset(tmp_path, anns, images)
    gt = ground_truth_coco(cfg)
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 0]
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3]
    assert gt["images"][0]["height"] == 40 and gt["images"][0]["width"] == 60  # read from the file
    polygon_pixels = mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(polygon, 40, 60)))
    assert gt["annotations"][0]["area"] == polygon_pixels
    assert gt["annotations"][1]["area"] == 300 and gt["annotations"][1]["bbox"] == [3.0, 2.0, 30.0, 10.0]
    ap = evaluate_ap(gt, ground_truth_as_detections(gt), max_dets=100)
    assert ap["bbox"]["AP"] == pytest.approx(1.0) and ap["segm"]["AP"] == pytest.approx(1.0)
    assert (
        corloc({n: b[0] for n, b in ground_truth_boxes(cfg).items()}, ground_truth_boxes(cfg))["corloc"] == 1
    )
    assert "iscrowd" not in json.loads(Path(cfg.annotations).read_text())["annotations"][0]  # file untouched


def test_box_only_ground_truth_gets_box_areas_and_box_ap_only(tmp_path):
    anns = [{"image_id": i, "bbox": [5, 5, 10 + i, 20], "segmentation": []} for i in (1, 2, 3)]
    gt = ground_truth_coco(coco_dataset(tmp_path, anns))
    assert [a["area"] for a in gt["annotations"]] == [220, 240, 260]
    assert all("segmentation" not in a for a in gt["annotations"])
    detections = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 1.0} for a in gt["annotations"]]
    assert evaluate_ap(gt, detections, 100)["bbox"]["AP"] == pytest.approx(1.0)
    # Detections with masks against box-only ground truth: box AP, and no KeyError from mask AP.
    with_masks = [{**d, "segmentation": rle_of(square(5, 5, 25, 15))} for d in detections]
    assert set(evaluate_ap(gt, with_masks, 100)) == {"bbox"}


@pytest.mark.parametrize(
    "annotation, problem",
    [
        ({"image_id": 1}, "annotations\\[0\\]: no 'bbox' and no 'segmentation'"),
        ({"image_id": 1, "bbox": [1, 2, 3]}, "annotations\\[0\\]: 'bbox' must be 4 numbers"),
        ({"image_id": 1, "bbox": [1, 2, -3, 4]}, "annotations\\[0\\]: 'bbox' has a negative width"),
        ({"image_id": 1, "segmentation": [[1, 2, 3, 4]]}, "'segmentation': polygon 0 needs an even number"),
        ({"image_id": 1, "segmentation": [1, 2, 3, 4, 5, 6]}, "'segmentation': polygon 0 must be a list"),
        (
            {"image_id": 1, "segmentation": {"size": [10, 10], "counts": "x"}},
            "RLE size \\[10, 10\\] != the image",
        ),
        ({"image_id": 1, "bbox": [0, 0, 1, 1], "iscrowd": 2}, "'iscrowd' must be 0 or 1"),
        ({"image_id": 9, "bbox": [0, 0, 1, 1]}, "'image_id' 9 is not the id of any image"),
        ({"bbox": [0, 0, 1, 1], "id": 4}, "annotations\\[0\\] \\(id 4\\): no 'image_id'"),
    ],
)
def test_ground_truth_that_cannot_be_filled_is_refused_by_file_entry_and_key(tmp_path, annotation, problem):
    cfg = coco_dataset(tmp_path, [annotation])
    with pytest.raises(DatasetError, match=problem) as e:
        ground_truth_coco(cfg)
    assert str(e.value).startswith(f"{cfg.annotations}: annotations[0]")


# ----------------------------------------------------------------------------------------------------------
# Dataset files checked when listing, before any work


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"images": [{"id": 1, "file_name": "1.png"}', "not valid JSON at line 1 column 44: .* truncated"),
        ("images: 1", "not valid JSON at line 1 column 1"),
        ("", "not valid JSON at line 1 column 1"),
        (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a JSON text file"),
        ("[1, 2]", "top level: not a COCO instances file"),
        ('{"images": [{"id": 1}]}', "images\\[0\\] \\(id 1\\): no 'file_name'"),
        ('{"images": [{"id": "a", "file_name": "1.png"}]}', "'id' must be an integer, got 'a'"),
        (
            '{"images": [{"id": 1, "file_name": "1.png"}, {"id": 1, "file_name": "2.png"}]}',
            "images\\[1\\] \\(id 1\\): duplicate image id 1 \\(also images\\[0\\] \\(id 1\\)\\)",
        ),
        (
            '{"images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "1.png"}]}',
            "images\\[1\\] \\(id 2\\): file_name '1.png' is also images\\[0\\]",
        ),
    ],
)
def test_coco_files_that_are_not_what_they_claim_are_named(tmp_path, content, problem):
    cfg = coco_dataset(tmp_path, [])
    path = Path(cfg.annotations)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError, match=problem) as e:
        list_images(cfg)
    assert str(path) in str(e.value)


def test_eval_corloc_names_a_malformed_ground_truth_before_looking_for_its_run(tmp_path, capsys):
    cfg = coco_dataset(tmp_path, [])
    Path(cfg.annotations).write_text('{"images": [')
    args = coco_command("eval-corloc", cfg.root, cfg.annotations)
    assert cli.main([*args, f"run.out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: annotations of dataset 'coco' {cfg.annotations}: not valid JSON at line 1")


def test_eval_corloc_given_a_self_training_run_says_to_evaluate_a_round(tmp_path):
    from pipeline.evaluate import eval_corloc
    from pipeline.runs import RunError

    cfg = coco_dataset(tmp_path, [{"id": 1, "image_id": 1, "bbox": [1, 1, 5, 5]}])
    run = tmp_path / "selftrain" / "handmade-maskcut-0123456789"
    (run / "round0").mkdir(parents=True)
    (run / "round0" / "summary.json").write_text("{}")
    overrides = [f"dataset.root={cfg.root}", f"dataset.annotations={cfg.annotations}"]
    with pytest.raises(
        RunError, match=f"^{run} is a self-training run: evaluate one of its rounds with make eval"
    ):
        eval_corloc(load_config("coco", "maskcut", overrides), run)


def test_many_problems_are_counted_in_one_line(tmp_path):
    images = [{"id": i % 3, "file_name": f"{i}.png"} for i in range(40)]
    cfg = coco_dataset(tmp_path, [], images)
    with pytest.raises(DatasetError, match="37 problems: .*; and 32 more$") as e:
        list_images(cfg)
    assert "\n" not in str(e.value)


def voc(tmp_path: Path, ids=("000001", "000002"), xml=None) -> DatasetConfig:
    root = tmp_path / "VOC2007"
    for sub in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    for i in dict.fromkeys(ids):
        Image.fromarray(object_image(48, 64, (8, 8, 30, 40))).save(root / "JPEGImages" / f"{i}.jpg")
        box = "<xmin>9</xmin><ymin>9</ymin><xmax>40</xmax><ymax>30</ymax>"
        body = f"<object><name>x</name><bndbox>{box}</bndbox></object>"
        (root / "Annotations" / f"{i}.xml").write_text(f"<annotation>{xml or body}</annotation>")
    return DatasetConfig("voc07", "voc", str(root), None, "trainval", "all")


def test_voc_problems_are_named_by_file_and_entry(tmp_path):
    cfg = voc(tmp_path)
    (Path(cfg.root) / "Annotations" / "000002.xml").unlink()
    split = Path(cfg.root) / "ImageSets" / "Main" / "trainval.txt"
    with pytest.raises(DatasetError, match=f"{split}: line 2: VOC annotation of image '000002' not found"):
        list_images(cfg)
    with pytest.raises(DatasetError, match="000002.xml"):  # eval-corloc: named, not a FileNotFoundError
        ground_truth_boxes(cfg)
    cfg = voc(tmp_path / "dup", ids=("000001", "000001"))
    with pytest.raises(DatasetError, match="line 2: image '000001' is listed twice"):
        list_images(cfg)
    cfg = voc(tmp_path / "bad", xml="<object><bndbox><xmin>a</xmin></bndbox>")
    with pytest.raises(DatasetError, match="000001.xml: not valid XML"):
        list_images(cfg)
    cfg = voc(
        tmp_path / "nan",
        xml="<object><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object>",
    )
    with pytest.raises(DatasetError, match="000001.xml: object 0: <xmin> must be a number, got 'a'"):
        list_images(cfg)


def test_video_dataset_problems_are_named(tmp_path):
    root = tmp_path / "davis"
    write_davis_videos(root, n_videos=2, n_frames=3, annotations="Annotations/480p")
    cfg = DatasetConfig("davis17", "davis", str(root), "Annotations/480p", "val", "all")
    (root / "ImageSets" / "2017" / "val.txt").write_text("video0\nvideo1\nnope\n")
    with pytest.raises(DatasetError, match="val.txt: line 3: video 'nope' has no frame folder"):
        list_videos(cfg)
    (root / "ImageSets" / "2017" / "val.txt").write_text("video0\nvideo1\n")
    (root / "Annotations" / "480p" / "video1" / "00002.png").unlink()
    videos = list_videos(cfg)  # masks are ground truth: checked when evaluating, all before any scoring
    with pytest.raises(DatasetError, match="video1: no mask for 1 of 3 frames \\(e.g. \\['00002.png'\\]\\)"):
        check_video_ground_truth(cfg, videos)
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(
        root / "Annotations" / "480p" / "video1" / "00002.png"
    )
    with pytest.raises(DatasetError, match="00002.png: a DAVIS mask must be a palette or grey PNG"):
        video_ground_truth(cfg, videos[1])

    ytvis = tmp_path / "ytvis.json"
    ytvis.write_text(
        json.dumps(
            {
                "videos": [
                    {"id": 1, "file_names": ["a/0.jpg", "a/1.jpg"], "width": 30, "height": 20},
                    {"id": 1, "file_names": [], "width": 30, "height": 20},
                ],
                "annotations": [{"video_id": 1, "segmentations": [None]}],
            }
        )
    )
    cfg = DatasetConfig("ytvis-bad", "ytvis", str(tmp_path), str(ytvis), None, "all")
    with pytest.raises(DatasetError) as e:
        list_videos(cfg)
    message = str(e.value)
    assert str(ytvis) in message and "videos[1] (id 1): 'file_names' must be a non-empty list" in message
    assert "videos[1] (id 1): duplicate video id 1" in message
    assert "annotations[0]: 'segmentations' must have one entry per frame (2), got 1" in message


# ----------------------------------------------------------------------------------------------------------
# Image folders: every format Pillow reads, and whatever is not taken is listed with the reason


def odd_folder(root: Path) -> None:
    rgb = object_image(96, 128, (20, 30, 70, 90))
    Image.fromarray(rgb).save(root / "a.jpg")
    Image.fromarray(rgb).save(root / "b.gif", save_all=True, append_images=[Image.fromarray(255 - rgb)])
    Image.fromarray(rgb).save(root / "c.tif")
    Image.fromarray(rgb).save(root / "d.BMP")
    (root / "x.jpg").mkdir()  # a folder named like an image
    Image.fromarray(rgb).save(root / "x.jpg" / "inner.png")
    (root / "loop.jpg").symlink_to("loop.jpg")
    (root / "broken.png").symlink_to("missing.png")
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to("..")  # a folder link loop
    (root / "notes.txt").write_text("not an image")
    os.mkfifo(root / "pipe.png")


def test_image_folder_takes_every_pillow_format_and_lists_the_rest(tmp_path):
    odd_folder(tmp_path)
    images, skipped = scan_folder(tmp_path)
    assert images == ["a.jpg", "b.gif", "c.tif", "d.BMP", "x.jpg/inner.png"]
    reasons = {s["file_name"]: s["reason"] for s in skipped}
    assert reasons == {
        "broken.png": "skipped: broken symbolic link (to missing.png)",
        "loop.jpg": "skipped: symbolic link loop",
        "notes.txt": "skipped: not an image format Pillow reads ('.txt')",
        "pipe.png": "skipped: not a regular file (a FIFO, socket or device)",
        "sub/up": f"skipped: link to a folder listed already ({tmp_path.resolve()}): not followed again",
        "x.jpg": "skipped: a folder named like an image (the files in it are listed on their own)",
    }


def test_folder_links_are_followed_once(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_image_folder(elsewhere, 2)
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(elsewhere)
    (root / "again").symlink_to(elsewhere)
    images, skipped = scan_folder(root)
    assert images == ["again/img1.png", "again/sub/img0.jpg"]  # linked folders are listed, once
    assert [s["file_name"] for s in skipped] == ["linked"]


# ----------------------------------------------------------------------------------------------------------
# Runs: the folder listing and the umask end to end, EXIF-rotated VOC images through every reader


def tiny(root, out) -> list[str]:
    return [
        f"dataset.root={root}",
        f"run.out_dir={out}",
        "run.workers=1",
        "backbone.arch=test_vit_tiny",
        "backbone.random_init=true",
        "backbone.batch_size=1",
        "method.resize=96",
    ]


@pytest.mark.usefixtures("ray_local")
def test_a_run_lists_skipped_entries_and_respects_the_umask(tmp_path):
    from pipeline.pseudolabels import run

    root = tmp_path / "images"
    root.mkdir()
    odd_folder(root)
    previous = os.umask(0o002)  # a shared group project: group-writable files
    try:
        path = run(load_config("imagefolder", "lost", tiny(root, tmp_path / "runs")))
    finally:
        os.umask(previous)
    labels = json.loads(path.read_text())
    assert sorted(im["file_name"] for im in labels["images"]) == [
        "a.jpg",
        "b.gif",
        "c.tif",
        "d.BMP",
        "x.jpg/inner.png",
    ]
    failures = [json.loads(line) for line in (path.parent / "failures.jsonl").read_text().splitlines()]
    assert {f["file_name"] for f in failures} == {
        "broken.png",
        "loop.jpg",
        "notes.txt",
        "pipe.png",
        "sub/up",
        "x.jpg",
    }
    assert all(f["reason"].startswith("skipped: ") for f in failures)
    summary = json.loads((path.parent / "summary.json").read_text())
    assert (summary["labelled"], summary["failed"], summary["skipped"]) == (5, 0, 6)
    for name in ("pseudolabels.json", "summary.json", "failures.jsonl", "images.json"):
        assert (path.parent / name).stat().st_mode & 0o777 == 0o664, name


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "out.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == mode


@pytest.mark.usefixtures("ray_local")
def test_exif_rotated_voc_image_agrees_everywhere(tmp_path):
    """Discovery, the written width/height, detectron2's mapper on the label file and the VOC ground truth
    all see the upright image."""
    from detectron2.data import DatasetCatalog

    from pipeline.pseudolabels import run
    from stages.common.io import load_rgb
    from stages.detection import train
    from stages.detection.detectron_config import cutler_cfg
    from stages.detection.detectron_data import ImageMapper

    cfg = voc(tmp_path, ids=("000001", "000002"))
    jpegs = Path(cfg.root) / "JPEGImages"
    upright = object_image(96, 128, (10, 20, 60, 70))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways (128 high), shown upright (96 high, 128 wide)
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(jpegs / "000001.jpg", exif=exif)
    # The same picture, upright and lossless (PNG data: the decoder goes by content, not by name).
    Image.fromarray(load_rgb(jpegs / "000001.jpg")).save(jpegs / "000002.jpg", format="PNG")
    config = load_config("voc07", "lost", tiny(cfg.root, tmp_path / "runs"))
    path = run(config)
    labels = json.loads(path.read_text())
    first, second = labels["images"]
    assert (first["width"], first["height"]) == (second["width"], second["height"]) == (128, 96)
    assert first["discovery_boxes"] == second["discovery_boxes"]  # discovery saw the upright pixels
    gt = ground_truth_coco(config.dataset)
    assert [(im["width"], im["height"]) for im in gt["images"]] == [(128, 96), (128, 96)]

    train.register_labels("exif-voc", path, cfg.root)
    d2cfg = cutler_cfg()
    d2cfg.merge_from_file(str(train.DETECTRON_CONFIGS / "cascade_mask_rcnn_R_50_FPN.yaml"))
    mapper = ImageMapper(d2cfg, is_train=True)
    for record in DatasetCatalog.get("exif-voc"):
        mapped = mapper(record)  # detectron2 checks the label file's size against the decoded image
        height, width = mapped["image"].shape[1:]
        assert height / width == pytest.approx(96 / 128, abs=0.02)
        if len(mapped["instances"]):
            assert tuple(mapped["instances"].gt_masks.tensor.shape[1:]) == (height, width)


# ----------------------------------------------------------------------------------------------------------
# The command line: one line per error, the traceback under --debug


def test_duplicate_ids_stop_the_run_before_any_work(tmp_path, capsys):
    images = [{"id": 1, "file_name": "1.png"}, {"id": 1, "file_name": "2.png"}]
    cfg = coco_dataset(tmp_path, [], images)
    out = tmp_path / "runs"
    argv = coco_command("pseudolabels", cfg.root, cfg.annotations)
    assert cli.main([*argv, *tiny(cfg.root, out)[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {cfg.annotations}: images[1] (id 1): duplicate image id 1 (also images[0] (id 1))"
    assert not out.exists()  # nothing was started


def test_a_root_holding_none_of_the_listed_images_stops_before_any_work(tmp_path, capsys):
    cfg = coco_dataset(tmp_path, [])
    elsewhere = tmp_path / "elsewhere"  # a real folder, but not the images' (DATA= pointing at the wrong one)
    elsewhere.mkdir()
    (elsewhere / "other.png").write_bytes((Path(cfg.root) / "1.png").read_bytes())
    out = tmp_path / "runs"
    argv = coco_command("pseudolabels", elsewhere, cfg.annotations)
    assert cli.main([*argv, *tiny(cfg.root, out)[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: none of the 3 images of dataset 'coco' is under {elsewhere} (the first: 1.png): "
        "check DATA= or dataset.root"
    )
    assert not out.exists()  # nothing was started


def raising_command(cfg, args):
    record = {"file_name": "a.jpg"}
    return record["iscrowd"]  # a library's KeyError, as pycocotools raised it


def test_unexpected_errors_are_one_line_and_tracebacks_need_debug(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "eval-corloc", (raising_command, "test"))
    assert cli.main(["eval-corloc"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: unexpected KeyError: 'iscrowd', raised at tests/test_bad_input.py:")
    assert "in raising_command" in err and "--debug" in err
    for argv in (["--debug", "eval-corloc"], ["eval-corloc", "--debug"]):
        with pytest.raises(KeyError):
            cli.main(argv)


def test_errors_from_libraries_name_their_file(tmp_path, monkeypatch, capsys):
    def missing_file(cfg, args):
        Image.open(tmp_path / "gone.png")

    monkeypatch.setitem(cli.COMMANDS, "eval-corloc", (missing_file, "test"))
    assert cli.main(["eval-corloc"]) == 1
    err = capsys.readouterr().err
    assert f"No such file or directory: '{tmp_path / 'gone.png'}'" in err and "raised at PIL/Image.py:" in err
    assert "called from tests/test_bad_input.py:" in err


def test_make_passes_debug_to_the_command():
    dry = subprocess.run(["make", "-n", "eval-corloc", "DEBUG=1"], cwd=REPO, capture_output=True, text=True)
    assert "-m pipeline --debug eval-corloc" in dry.stdout
    dry = subprocess.run(["make", "-n", "eval-corloc"], cwd=REPO, capture_output=True, text=True)
    assert "--debug" not in dry.stdout
