"""The pseudo-label run on Ray: valid output, failures listed, resume after a re-run or a kill, the same
bytes from one or two workers, dead workers replaced. Kill points are test hooks (a process kills itself
after shard k), never timing."""

import json
import signal

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.config import load_config, replace
from pipeline.driver import EXIT_AFTER_SHARDS, WORKER_EXIT
from pipeline.pseudolabels import run
from pipeline.runs import RunError
from tests.processes import run_pipeline
from tests.synthetic import write_image_folder

pytestmark = pytest.mark.usefixtures("ray_local")


def overrides(root, out):
    return [
        f"dataset.root={root}",
        f"run.out_dir={out}",
        "run.shard_size=3",
        "run.workers=2",
        "run.overlays=2",
        "backbone.arch=test_vit_tiny",
        "backbone.random_init=true",
        "backbone.batch_size=1",  # every image alone (test_one_and_two_workers... uses the default)
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
    record = (path.parent / "config.yaml").read_text()
    seconds = json.loads((path.parent / "summary.json").read_text())["seconds"]
    # a resume that differs only in how it executes: same run, and its record keeps the first run's
    assert run(replace(cfg, **{"run.workers": 1})) == path
    assert [p.stat().st_mtime_ns for p in shards] == before
    assert path.read_text() == content
    assert (path.parent / "config.yaml").read_text() == record and "workers: 2" in record
    assert seconds > 0 and json.loads((path.parent / "summary.json").read_text())["seconds"] >= seconds


def test_killed_run_resumes_and_ends_identical(images, first_run, tmp_path, capsys):
    args = overrides(images, tmp_path)  # the first run's settings: the same shards
    selection = ["--dataset", "imagefolder", "--method", "maskcut"]
    status = run_pipeline("pseudolabels", selection + args, {EXIT_AFTER_SHARDS: "2"})
    assert status == -signal.SIGKILL  # the driver killed itself right after writing its second shard
    (run_dir,) = (tmp_path / "pseudolabels").iterdir()
    shards = sorted((run_dir / "shards").glob("shard-*.json"))
    assert len(shards) == 2 and not (run_dir / "pseudolabels.json").exists()
    assert not list(run_dir.rglob(".*tmp"))  # no half-written file survives the kill
    mtimes = [p.stat().st_mtime_ns for p in shards]

    capsys.readouterr()
    path = run(load_config("imagefolder", "maskcut", args))
    assert [p.stat().st_mtime_ns for p in shards] == mtimes  # finished shards were not recomputed
    assert "maskcut: resuming: 2 of 4 shards already done, 2 to compute" in capsys.readouterr().err
    _, reference = first_run
    assert path.read_bytes() == reference.read_bytes()


def test_one_and_two_workers_write_identical_labels(images, tmp_path):
    # At the default batch size: images are batched within a shard, and shards do not depend on workers.
    paths = []
    for workers in (1, 2):
        args = [a for a in overrides(images, tmp_path / str(workers)) if not a.startswith("backbone.batch")]
        paths.append(run(load_config("imagefolder", "maskcut", [*args, f"run.workers={workers}"])))
    one, two = paths
    assert one.read_bytes() == two.read_bytes()
    overlays = [sorted((p.parent / "overlays").glob("*.png")) for p in paths]
    assert [p.read_bytes() for p in overlays[0]] == [p.read_bytes() for p in overlays[1]]


def test_a_dead_worker_is_replaced_and_its_shard_retried(images, first_run, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setenv(WORKER_EXIT, f"{marker}:1,3")  # the worker process kills itself in shards 1 and 3
    path = run(load_config("imagefolder", "maskcut", overrides(images, tmp_path / "runs")))
    assert (tmp_path / "died.1").exists() and (tmp_path / "died.3").exists()  # both deaths happened
    _, reference = first_run
    assert path.read_bytes() == reference.read_bytes()


def test_shards_whose_worker_always_dies_fail_by_name_and_the_rest_finish(images, tmp_path, monkeypatch):
    monkeypatch.setenv(WORKER_EXIT, ":0,2")  # every worker that starts shard 0 or 2 dies
    cfg = load_config("imagefolder", "maskcut", [*overrides(images, tmp_path), "run.shard_retries=1"])
    with pytest.raises(RunError) as error:
        run(cfg)
    message = str(error.value)
    assert "2 of 4 maskcut shards failed" in message
    assert "shard-00000 (3 items, first corrupt.jpg): its worker died 2 times" in message
    assert "shard-00002 (3 items" in message and "shard-00001" not in message
    (run_dir,) = (tmp_path / "pseudolabels").iterdir()
    names = sorted(p.name for p in (run_dir / "shards").glob("shard-*.json"))
    assert names == ["shard-00001.json", "shard-00003.json"]  # live actors did every other shard


def test_changed_image_list_is_refused(images, first_run):
    cfg, _ = first_run
    extra = images / "new.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(extra)
    try:
        with pytest.raises(RunError, match=r"image list changed since .* \(1 image added \(new.png\)\); "):
            run(cfg)
    finally:
        extra.unlink()


def test_discovery_boxes_are_mapped_back_from_the_resized_image(images, first_run):
    # method.resize=96 squeezes the 128x96 images to 96x96 (12x12 patches of 8): every discovery box must
    # come back in the image's own pixels, x scaled by 128/96. The patch masks are recomputed here with the
    # workers' backbone (same seeded random init, one image per pass) and boxed by hand.
    import torch

    from pipeline.resolve import resolve
    from pipeline.runs import load_backbone
    from stages.common.io import load_rgb
    from stages.discovery.base import keys_to_masks
    from stages.features.backbone import network_image, prepare_image

    cfg, path = first_run
    cfg = resolve(cfg)
    backbone = load_backbone(cfg.backbone, cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers (run.threads_per_worker=1)
    try:
        checked = []
        for image in json.loads(path.read_text())["images"]:
            if (image["height"], image["width"]) != (96, 128):
                continue
            work = network_image(load_rgb(images / image["file_name"]), 8, 96)
            feats = backbone(prepare_image(work, 8, None)[None])
            masks = keys_to_masks(feats.keys[0, 1:], feats.grid, cfg.method, backbone.family)
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


def test_refinement_in_processes_writes_identical_labels(images, first_run, tmp_path):
    # Masks leave the model worker and are refined in its refinement processes, while the backbone runs on.
    args = [*overrides(images, tmp_path), "run.refine_processes=1"]
    path = run(load_config("imagefolder", "maskcut", args))
    _, reference = first_run
    assert path.parent.name == reference.parent.name  # same run, executed differently: same directory name
    assert path.read_bytes() == reference.read_bytes()
    overlays = [sorted((p.parent / "overlays").glob("*.png")) for p in (path, reference)]
    assert [p.read_bytes() for p in overlays[0]] == [p.read_bytes() for p in overlays[1]]


def test_a_run_starts_its_own_ray_unless_given_a_cluster(monkeypatch):
    """Another Ray on the machine (`ray start`, another project's) is not joined by accident: ray.init()
    without an address would attach to it and then refuse our object store setting."""
    import ray

    from pipeline import driver

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    driver.ensure_ray(None, 100)
    driver.ensure_ray("10.0.0.5:6379", 100)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.6:6379")
    driver.ensure_ray(None, 100)
    assert [c["address"] for c in calls] == ["local", "10.0.0.5:6379", "10.0.0.6:6379"]
    assert calls[0]["object_store_memory"] == 100 * 2**20
