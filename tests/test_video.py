"""BA on videos: streamed clustering, video datasets, an end-to-end run with stable identities, correlator
training that resumes."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from pipeline import evaluate, train_correlator
from pipeline.config import load_config, replace
from pipeline.pseudolabels import run as pseudolabels
from stages.common.export import validate_coco
from stages.data.datasets import ground_truth_boxes, ground_truth_coco, list_images
from stages.data.videos import list_videos, video_ground_truth, video_truth
from stages.detection.train import check_labels
from stages.features.backbone import Backbone
from stages.video.ba import ba_tracks
from stages.video.ba_cluster import background_cluster, cluster_attention, instance_tracks
from tests.synthetic import write_davis_videos


def test_streamed_clustering_equals_the_blockwise_algorithm():
    # Attention rows from 4 distinct distributions, in 5 frames of 3x4 patches; windows of 2 frames.
    gen = torch.Generator().manual_seed(0)
    groups = torch.softmax(4 * torch.randn(4, 24, generator=gen), dim=1)
    assign = torch.randint(0, 4, (60,), generator=gen)
    attn = groups[assign] + 0.002 * torch.rand(60, 24, generator=gen)
    attn = attn / attn.sum(1, keepdim=True)
    cfg = load_config(
        "demo-video", "ba", ["method.window=2", "method.tau=1.0", "method.max_rounds=50"]
    ).method
    n = 12
    streamed = ba_tracks(lambda frames: attn[frames[0] * n : (frames[-1] + 1) * n], 5, (3, 4), cfg)
    labels = cluster_attention(
        attn, 1.0, 50, first_round_block=2 * n, smooth=cfg.smooth_first_round, weights=cfg.centroid_weights
    ).reshape(5, 3, 4)
    reference = instance_tracks(labels, background_cluster(labels, "border"))
    assert torch.equal(streamed, reference)
    assert len(torch.unique(streamed)) > 1


def test_frame_folders_sort_numerically(tmp_path):
    for name in ("frame10.jpg", "frame2.jpg", "frame1.jpg"):
        (tmp_path / "clip").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "clip" / name)
    cfg = load_config("videofolder", "ba", [f"dataset.root={tmp_path}"]).dataset
    (clip,) = list_videos(cfg)
    assert clip.frames == ("clip/frame1.jpg", "clip/frame2.jpg", "clip/frame10.jpg")
    assert [r.file_name for r in list_images(cfg)] == list(clip.frames)  # frames double as images


def _set_void(ann: Path) -> None:
    ids = np.array(Image.open(ann))
    ids[0, :5] = 255  # DAVIS marks void pixels 255
    label = Image.fromarray(ids, mode="P")
    label.putpalette(Image.open(ann).getpalette())
    label.save(ann)


def test_davis_void_is_background_and_returned_apart(tmp_path):
    write_davis_videos(tmp_path, n_videos=1, n_frames=2)
    _set_void(tmp_path / "Annotations_unsupervised" / "480p" / "video0" / "00000.png")
    davis = load_config("davis17", "ba", [f"dataset.root={tmp_path}"]).dataset
    gt, void = video_truth(davis, list_videos(davis)[0])
    assert gt.shape == void.shape == (2, 64, 96) and set(np.unique(gt)) == {0, 1, 2}
    assert void.sum() == 5 and void[0, 0, :5].all() and (gt[void] == 0).all()
    assert np.array_equal(video_ground_truth(davis, list_videos(davis)[0]), gt)


def test_davis17_reads_the_unsupervised_annotations(tmp_path):
    # The semi-supervised folder holds other objects (here: only object 1); DAVIS-17 unsupervised is
    # scored on Annotations_unsupervised/480p, a dataset key that can name another folder.
    write_davis_videos(tmp_path, n_videos=1, n_frames=2)
    semi = tmp_path / "Annotations" / "480p" / "video0"
    semi.mkdir(parents=True)
    for ann in sorted((tmp_path / "Annotations_unsupervised" / "480p" / "video0").glob("*.png")):
        ids = np.array(Image.open(ann))
        Image.fromarray(np.where(ids == 1, 1, 0).astype(np.uint8), mode="P").save(semi / ann.name)
    davis = load_config("davis17", "ba", [f"dataset.root={tmp_path}"]).dataset
    assert davis.annotations == "Annotations_unsupervised/480p"
    (video0,) = list_videos(davis)
    assert set(np.unique(video_ground_truth(davis, video0))) == {0, 1, 2}
    other = load_config("davis17", "ba", [f"dataset.root={tmp_path}", "dataset.annotations=Annotations/480p"])
    assert set(np.unique(video_ground_truth(other.dataset, video0))) == {0, 1}


def test_video_ground_truth_as_per_frame_coco(tmp_path):
    # Frames double as images for the detector, so its AP and CorLoc need the video masks as COCO.
    write_davis_videos(tmp_path, n_videos=2, n_frames=3)
    davis = load_config("davis17", "ba", [f"dataset.root={tmp_path}"]).dataset
    gt = ground_truth_coco(davis)
    validate_coco(gt)
    assert [im["id"] for im in gt["images"]] == [r.id for r in list_images(davis)]
    assert len(gt["annotations"]) == 2 * 3 * 2  # two objects in every frame
    assert all(a["area"] == 400 for a in gt["annotations"])  # 20x20 squares
    boxes = ground_truth_boxes(davis)["JPEGImages/480p/video0/00001.png"]
    assert sorted(boxes.tolist()) == [[8.0, 8.0, 28.0, 28.0], [66.0, 36.0, 86.0, 56.0]]
    (tmp_path / "Annotations_unsupervised").rename(tmp_path / "no-annotations")
    assert ground_truth_coco(davis) is None


def test_youtube_vis_layout_lists_videos_and_decodes_masks(tmp_path):
    # Two frames of one video; one object in uncompressed RLE (frame 0) and a polygon (frame 1).
    (tmp_path / "JPEGImages" / "clip").mkdir(parents=True)
    for name in ("00000.jpg", "00005.jpg"):
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "JPEGImages" / "clip" / name)
    box = np.zeros((20, 30), np.uint8)
    box[2:6, 3:9] = 1
    flat = box.T.ravel().tolist()  # uncompressed RLE: column-major run lengths, zeros first
    runs = [len(list(g)) for _, g in itertools.groupby(flat)]
    rle = {"size": [20, 30], "counts": runs if flat[0] == 0 else [0, *runs]}
    polygon = [[10.0, 10.0, 20.0, 10.0, 20.0, 15.0, 10.0, 15.0]]
    meta = {"id": 7, "file_names": ["clip/00000.jpg", "clip/00005.jpg"], "height": 20, "width": 30}
    data = {"videos": [meta], "annotations": [{"video_id": 7, "segmentations": [rle, polygon]}]}
    (tmp_path / "train.json").write_text(json.dumps(data))
    cfg = load_config(
        "ytvis", "ba", [f"dataset.root={tmp_path}", f"dataset.annotations={tmp_path / 'train.json'}"]
    )
    (clip,) = list_videos(cfg.dataset)
    assert (clip.id, clip.name, clip.frames) == (
        7,
        "clip",
        ("JPEGImages/clip/00000.jpg", "JPEGImages/clip/00005.jpg"),
    )
    gt = video_ground_truth(cfg.dataset, clip)
    assert gt.shape == (2, 20, 30)
    assert np.array_equal(gt[0] == 1, box.astype(bool))
    assert gt[1, 11:15, 11:20].all() and not gt[1, :9].any()


@pytest.fixture(scope="module")
def similarity_vit(tmp_path_factory):
    """A toy checkpoint whose last block attends by token similarity (keys = queries, scaled up): random
    weights alone give uniform attention, in which nothing can be told apart."""
    backbone = Backbone("test_vit_tiny", None, "cpu", random_init=True)
    qkv = backbone.model.blocks[-1].attn.qkv.weight.data
    c = qkv.shape[1]
    qkv[:c] *= 8
    qkv[c : 2 * c] = qkv[:c]
    path = tmp_path_factory.mktemp("weights") / "similarity_vit.pth"
    torch.save(backbone.model.state_dict(), path)
    return path


def ba_config(videos, out, weights, extra=()):
    overrides = [
        f"dataset.root={videos}",
        f"run.out_dir={out}",
        "backbone.arch=test_vit_tiny",
        f"backbone.weights={weights}",
        "method.size=[64, 96]",
        "run.workers=2",
        *extra,
    ]
    return load_config("davis17", "ba", overrides)


@pytest.mark.usefixtures("ray_local")
def test_ba_run_writes_tracks_with_stable_identities(davis_videos, similarity_vit, tmp_path):
    cfg = ba_config(davis_videos, tmp_path, similarity_vit)
    labels = pseudolabels(cfg)
    run_dir = labels.parent
    coco = COCO(str(labels))
    assert len(coco.getImgIds()) == 12 and coco.getAnnIds()
    tracks = json.loads((run_dir / "ytvis.json").read_text())
    assert {v["name"] for v in tracks["videos"]} == {"video0", "video1"}
    for track in tracks["annotations"]:
        assert len(track["segmentations"]) == 6
    for v in list_videos(cfg.dataset):
        gt = video_ground_truth(cfg.dataset, v)
        pred = evaluate.predicted_ids(tracks, v.id, gt.shape)
        track_of = {}
        for obj in (1, 2):  # the same track covers each object in every frame
            owners = {np.bincount(pred[t][gt[t] == obj]).argmax() for t in range(len(gt))}
            assert len(owners) == 1 and owners != {0}
            track_of[obj] = owners.pop()
        assert track_of[1] != track_of[2]  # two objects, two tracks (not one track over both)
    assert len(list((run_dir / "overlays").glob("*.gif"))) == 2
    metrics = evaluate.evaluate_video(cfg)
    assert 0.3 < metrics["J&F"] <= 1 and 0 < metrics["FG-ARI"] <= 1
    # The per-frame COCO is a valid training set for the detector (frames as images).
    check_labels(labels, str(davis_videos), {r.file_name for r in list_images(cfg.dataset)})
    mtimes = [p.stat().st_mtime_ns for p in run_dir.glob("shards/*.json")]
    assert pseudolabels(cfg) == labels
    assert [p.stat().st_mtime_ns for p in run_dir.glob("shards/*.json")] == mtimes


def test_correlator_training_resumes_where_it_stopped(davis_videos, similarity_vit, tmp_path):
    tiny = [
        "correlator.size=[32, 48]",
        "correlator.batch_size=1",
        "correlator.stride=1",
        "correlator.checkpoint_every=1",
        "correlator.num_pos=2",
        "correlator.num_neg=4",
    ]
    cfg = ba_config(davis_videos, tmp_path, similarity_vit, [*tiny, "correlator.steps=2"])
    path = train_correlator.train_correlator(cfg)
    first = torch.load(path, weights_only=True)
    assert first["step"] == 2
    longer = replace(cfg, **{"correlator.steps": 3})
    assert train_correlator.train_correlator(longer) == path  # same run directory: steps are not in its hash
    second = torch.load(path, weights_only=True)
    assert second["step"] == 3
    assert any(not torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    # the losses and the entropy weights' effective sample size are in TensorBoard, one point per step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(Path(path).parent / "tensorboard"))
    board.Reload()
    assert {"loss/total", "loss/semantic", "loss/motion", "weights/effective_sample_size"} <= set(
        board.Tags()["scalars"]
    )
    ess = board.Scalars("weights/effective_sample_size")
    assert [e.step for e in ess] == [1, 2, 3]
    assert all(1 <= e.value <= 3 * 4 * 6 for e in ess)  # at most the T * n rows of a clip (3 frames of 4x6)
    # BA now finds and uses this correlator for the dataset.
    assert train_correlator.resolve_correlator(cfg).correlator.checkpoint == str(path)
    assert Path(path).parent.name.startswith("davis17-correlator-")
    # ... unless the frozen ViT attention is asked for by name.
    frozen = replace(cfg, **{"correlator.checkpoint": "frozen"})
    assert train_correlator.resolve_correlator(frozen).correlator.checkpoint is None


@pytest.mark.usefixtures("ray_local")
def test_a_run_of_25_videos_with_over_300_frame_masks_merges_and_validates(similarity_vit, tmp_path):
    root = tmp_path / "davis"
    write_davis_videos(root, n_videos=25, n_frames=6)
    labels = pseudolabels(ba_config(root, tmp_path / "runs", similarity_vit, ["run.overlays=1"]))
    data = json.loads(labels.read_text())
    validate_coco(data)
    summary = json.loads((labels.parent / "summary.json").read_text())
    assert len(data["images"]) == 150 and len({im["id"] for im in data["images"]}) == 150
    assert summary["frame_masks"] == len(data["annotations"]) >= 300  # two objects in every frame
    tracks = json.loads((labels.parent / "ytvis.json").read_text())
    assert len(tracks["videos"]) == 25 and len(tracks["annotations"]) == summary["tracks"]
    masks = sum(seg is not None for t in tracks["annotations"] for seg in t["segmentations"])
    assert masks == len(data["annotations"])
    assert [t["id"] for t in tracks["annotations"]] == list(range(1, summary["tracks"] + 1))
    assert len(list((labels.parent / "overlays").glob("*.gif"))) == 1
