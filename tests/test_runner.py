"""The pseudo-label run on Ray: valid output, failures listed, resume after a re-run or a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.config import load_config
from pipeline.pseudolabels import run
from pipeline.runs import RunError
from tests.synthetic import write_image_folder

pytestmark = pytest.mark.usefixtures("ray_local")


def overrides(root, out, shard_size=3):
    return [
        f"dataset.root={root}",
        f"run.out_dir={out}",
        f"run.shard_size={shard_size}",
        "run.workers=2",
        "run.overlays=2",
        "backbone.arch=test_vit_tiny",
        "backbone.random_init=true",
        "backbone.batch_size=1",  # every image alone: identical numbers whatever the sharding
        "method.resize=96",
    ]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, 7)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff broken")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "tiny.png")
    Image.fromarray(np.full((80, 120), 90, np.uint8)).save(root / "gray.png")
    return root


@pytest.fixture(scope="module")
def first_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("imagefolder", "maskcut", overrides(images, out))
    return cfg, run(cfg)


def test_run_writes_valid_coco_with_failures_listed(first_run):
    _, path = first_run
    run_dir = path.parent
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == 8  # 7 objects + the grayscale image
    for image in coco.dataset["images"]:
        assert (image["height"], image["width"]) == (
            (80, 120) if image["file_name"] == "gray.png" else (96, 128)
        )
    assert coco.dataset["annotations"], "the planted red boxes give masks"
    failures = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    reasons = {f["file_name"]: f["reason"] for f in failures}
    assert set(reasons) == {"corrupt.jpg", "tiny.png"}
    assert reasons["corrupt.jpg"].startswith("unreadable") and reasons["tiny.png"].startswith("tiny")
    assert json.loads((run_dir / "summary.json").read_text())["failed"] == 2
    assert "random_init: true" in (run_dir / "config.yaml").read_text()  # the resolved config is kept
    # overlays for the first two images in order: corrupt.jpg (none possible) and gray.png (id 2)
    assert [p.name for p in (run_dir / "overlays").glob("*.png")] == ["00000002.png"]


def test_second_run_skips_every_shard(first_run):
    cfg, path = first_run
    shards = sorted((path.parent / "shards").glob("*.json"))
    assert len(shards) == 4  # 10 images, 3 per shard
    before = [p.stat().st_mtime_ns for p in shards]
    content = path.read_text()
    assert run(cfg) == path
    assert [p.stat().st_mtime_ns for p in shards] == before
    assert path.read_text() == content


def test_killed_run_resumes_and_ends_identical(images, first_run, tmp_path):
    args = overrides(images, tmp_path, shard_size=1)
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "pseudolabels",
        "--dataset",
        "imagefolder",
        "--method",
        "maskcut",
    ]
    proc = subprocess.Popen(
        cmd + args + ["run.workers=1"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    shard_dir = None
    deadline = time.time() + 120
    while time.time() < deadline:
        found = list(tmp_path.glob("pseudolabels/*/shards/shard-*.json"))
        if len(found) >= 2:
            shard_dir = found[0].parent
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert shard_dir is not None, "the run never finished a shard"
    done = len(list(shard_dir.glob("shard-*.json")))
    assert 2 <= done < 10 and not (shard_dir.parent / "pseudolabels.json").exists()
    assert not list(shard_dir.glob(".*tmp"))  # no half-written shard survives the kill

    path = run(load_config("imagefolder", "maskcut", args))
    _, reference = first_run
    assert json.loads(path.read_text()) == json.loads(reference.read_text())


def test_changed_image_list_is_refused(images, first_run):
    cfg, _ = first_run
    extra = images / "new.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(extra)
    try:
        with pytest.raises(RunError, match="image list changed"):
            run(cfg)
    finally:
        extra.unlink()


def test_discovery_boxes_are_mapped_back_from_the_resized_image(images, first_run):
    # method.resize=96 squeezes the 128x96 images to 96x96 (12x12 patches of 8): every discovery box must
    # come back in the image's own pixels, x scaled by 128/96. The patch masks are recomputed here with the
    # workers' backbone (same seeded random init, one image per pass) and boxed by hand.
    import torch

    from pipeline.runs import load_backbone, resolve_backbone
    from stages.backbone import network_image, prepare_image
    from stages.discover import find_objects
    from stages.io import load_rgb

    cfg, path = first_run
    cfg = resolve_backbone(cfg)
    backbone = load_backbone(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers (run.threads_per_worker=1)
    try:
        checked = []
        for image in json.loads(path.read_text())["images"]:
            if (image["height"], image["width"]) != (96, 128):
                continue
            work = network_image(load_rgb(images / image["file_name"]), 8, 96)
            feats = backbone(prepare_image(work, 8, None)[None])
            masks = find_objects(feats.keys[0, 1:], feats.grid, cfg.method, backbone.family)
            expected = []
            for mask in masks:
                ys, xs = np.nonzero(mask)
                x0, y0, x1, y1 = 8 * xs.min(), 8 * ys.min(), 8 * (xs.max() + 1), 8 * (ys.max() + 1)
                expected.append([x0 * 128 / 96, y0, (x1 - x0) * 128 / 96, y1 - y0])
            assert np.allclose(image["discovery_boxes"], np.reshape(expected, (-1, 4)))
            checked += expected
    finally:
        torch.set_num_threads(threads)
    assert any(box[0] > 0 or box[2] < 128 for box in checked)  # some box where the x scale shows
