"""ssl-vos as a registered video method, through the real pipeline (Ray driver, run directories) on
generated DAVIS-layout videos: one foreground track per video on the moving objects, flows computed once
per frame pair by their own stage and reused, long videos in windows."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline import evaluate
from pipeline.config import ConfigError, load_config, replace
from pipeline.pseudolabels import run as pseudolabels
from stages.common.export import validate_coco
from stages.data.videos import VideoRecord, list_videos, video_ground_truth
from stages.features.backbone import Backbone
from stages.pseudolabels import run_pairs, run_video
from stages.video.sslvos import SSLVOS, FlowCache, flow_file, read_flow_file
from tests.synthetic import single_object_video

SIZE = ["method.size=[64, 96]", "method.fine_size=[32, 48]", "backbone.arch=test_vit_tiny"]


def write_single_object_davis(root, n_videos: int, n_frames: int, size=(64, 96)) -> None:
    """Videos of one moving textured square (``single_object_video``) in DAVIS-17 layout, ids 1."""
    names = [f"video{v}" for v in range(n_videos)]
    for v, name in enumerate(names):
        frames, masks = single_object_video(n_frames, size, seed=v)
        for folder in ("JPEGImages/480p", "Annotations_unsupervised/480p"):
            (root / folder / name).mkdir(parents=True)
        for t, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
            Image.fromarray(frame).save(root / "JPEGImages/480p" / name / f"{t:05d}.jpg", quality=95)
            Image.fromarray(mask.astype(np.uint8), mode="L").save(
                root / "Annotations_unsupervised/480p" / name / f"{t:05d}.png"
            )
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(names) + "\n")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("davis")
    write_single_object_davis(root, n_videos=2, n_frames=6)
    return root


def sslvos_config(videos, out, weights, extra=()):
    overrides = [
        f"dataset.root={videos}",
        f"run.out_dir={out}",
        f"backbone.weights={weights}",
        "run.workers=2",
        "run.shard_size=4",
        *SIZE,
        *extra,
    ]
    return load_config("davis17", "sslvos", overrides)


def foreground_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of the predicted foreground (any id) with the union of the ground-truth objects, whole video."""
    p, g = pred > 0, gt > 0
    return float((p & g).sum() / (p | g).sum())


@pytest.mark.usefixtures("ray_local")
def test_sslvos_run_writes_one_foreground_track_and_reuses_its_flows(videos, random_vit_weights, tmp_path):
    cfg = sslvos_config(videos, tmp_path, random_vit_weights)
    labels = pseudolabels(cfg)
    run_dir = labels.parent
    data = json.loads(labels.read_text())
    validate_coco(data)
    assert len(COCO(str(labels)).getImgIds()) == 12
    tracks = json.loads((run_dir / "ytvis.json").read_text())
    assert len(tracks["videos"]) == 2
    assert sorted(t["video_id"] for t in tracks["annotations"]) == [1, 2]  # one track per video
    for v in list_videos(cfg.dataset):
        gt = video_ground_truth(cfg.dataset, v)
        pred = evaluate.predicted_ids(tracks, v.id, gt.shape)
        assert foreground_iou(pred, gt) > 0.5, v.name  # the moving square, not the background
    # One flow file per frame pair (5 per video), written by the driver under the run directory.
    flows = sorted(run_dir.glob("flows/dis-medium/video*/*.npy"))
    assert len(flows) == 10
    forward, backward = read_flow_file(flows[0])
    assert forward.shape == backward.shape == (64, 96, 2)
    # A second run whose video shards must be computed again (e.g. after a code version change) reads the
    # cached flows: they are not computed nor written again, and the tracks are the same.
    stamps = {p: p.stat().st_mtime_ns for p in flows}
    for shard in run_dir.glob("shards/*.json"):
        shard.unlink()
    (run_dir / "ytvis.json").unlink()
    assert pseudolabels(cfg) == labels
    assert {p: p.stat().st_mtime_ns for p in flows} == stamps
    assert json.loads((run_dir / "ytvis.json").read_text()) == tracks
    # Evaluation: DAVIS-17 protocol on this multi-object dataset.
    metrics = evaluate.evaluate_video(cfg)
    assert 0 < metrics["J"] <= 1 and 0 < metrics["F"] <= 1


@pytest.mark.usefixtures("ray_local")
def test_sslvos_long_video_in_windows_matches_one_window(tmp_path, random_vit_weights):
    # 40 frames: keys in windows of 5 frames and the fine pass in windows of 8 give the planted objects as
    # well as one window over the whole video does.
    root = tmp_path / "davis"
    write_single_object_davis(root, n_videos=1, n_frames=40, size=(64, 160))
    windowed = ["method.window=5", "method.optimise.window=8", "method.optimise.overlap=2"]
    whole = ["method.window=40", "method.optimise.window=40", "method.optimise.overlap=0"]
    ious = []
    for name, extra in (("windowed", windowed), ("whole", whole)):
        cfg = sslvos_config(root, tmp_path / name, random_vit_weights, ["method.size=[64, 160]", *extra])
        tracks = json.loads((pseudolabels(cfg).parent / "ytvis.json").read_text())
        (video,) = list_videos(cfg.dataset)
        gt = video_ground_truth(cfg.dataset, video)
        ious.append(foreground_iou(evaluate.predicted_ids(tracks, video.id, gt.shape), gt))
    assert ious[0] > 0.5 and abs(ious[0] - ious[1]) < 0.1


def test_flow_file_round_trip_and_cache_folder():
    forward = np.random.default_rng(0).normal(0, 5, (6, 7, 2)).astype(np.float32)
    data = np.load(io.BytesIO(flow_file(forward, -forward)))
    assert data.shape == (2, 6, 7, 2) and data.dtype == np.float16
    assert np.abs(data[0] - forward).max() < 0.01
    cfg = load_config("davis17", "sslvos")
    assert FlowCache(cfg.method.flow).folder == "flows/dis-medium"


def test_sslvos_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="method.flow.weights"):
        load_config("davis17", "sslvos", [f"method.flow.weights={tmp_path / 'raft.pth'}"])
    with pytest.raises(ConfigError, match="method.optimise.overlap"):
        load_config("davis17", "sslvos", ["method.optimise.overlap=40"])
    with pytest.raises(ConfigError, match="method.flow.preset"):
        load_config("davis17", "sslvos", ["method.flow.preset=slow"])


def test_single_frame_video_needs_no_flow():
    backbone = Backbone("test_vit_tiny", None, "cpu", random_init=True)
    cfg = load_config("davis17", "sslvos", SIZE)
    method = SSLVOS(backbone, replace(cfg.method, refine="none"), cfg.refine, 2)
    frame = np.full((64, 96, 3), 30, np.uint8)
    frame[8:40, 20:52] = (220, 40, 40)
    ids = method([frame])
    assert ids.shape == (1, 64, 96) and set(np.unique(ids)) <= {0, 1}
    assert ids[0, 12:36, 24:48].mean() > 0.8 and ids[0, 50:, :].mean() < 0.2


def test_an_unreadable_frame_fails_its_pairs_and_its_video_by_name(tmp_path):
    frames, _ = single_object_video(3)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{t}.png")
    (tmp_path / "1.png").write_bytes(b"not an image")
    video = VideoRecord(1, "clip", ("0.png", "1.png", "2.png"), str(tmp_path))
    data, files = run_pairs(lambda a, b: b"flow", "flows/x", [(video, 0), (video, 1)])
    assert files == {} and [f["pair"] for f in data["failures"]] == ["clip/0.npy", "clip/1.npy"]
    pairs = [str(tmp_path / "flows/x/clip/0.npy"), str(tmp_path / "flows/x/clip/1.npy")]
    shard, _ = run_video(None, video, False, pairs)  # fails before the method is called
    assert shard["video"] is None and shard["failures"][0]["video"] == "clip"
    assert "1.png" in shard["failures"][0]["reason"]
