"""Single-object video datasets (DAVIS-2016, SegTrack-v2, FBMS-59) in their own layouts, generated tiny, and
their evaluation with the DAVIS-2016 protocol (J and F per sequence over its annotated frames, averaged over
sequences)."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline import evaluate
from pipeline.config import load_config
from stages.common.export import encode_mask
from stages.data.annotations import DatasetError
from stages.data.videos import evaluation_protocol, list_videos, video_truth
from stages.evaluation.video_metrics import foreground_jf
from tests.synthetic import single_object_video

N_FRAMES = 6


def save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_davis2016(root) -> dict[str, list[np.ndarray]]:
    """Two listed videos (one object split into ids 1 and 2, DAVIS-17 style), one unlisted video."""
    truth = {}
    for v, name in enumerate(["bear", "cows", "unlisted"]):
        frames, masks = single_object_video(N_FRAMES, seed=v)
        for t, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
            save(root / "JPEGImages/480p" / name / f"{t:05d}.jpg", frame)
            ids = mask.astype(np.uint8)
            ids[: ids.shape[0] // 2] *= 2  # the object's top half is another id: merged into one foreground
            label = Image.fromarray(ids, mode="P")
            label.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
            (root / "Annotations/480p" / name).mkdir(parents=True, exist_ok=True)
            label.save(root / "Annotations/480p" / name / f"{t:05d}.png")
        truth[name] = masks
    (root / "ImageSets/2016").mkdir(parents=True)
    (root / "ImageSets/2016/val.txt").write_text("bear\ncows\n")
    return truth


def write_segtrack(root) -> dict[str, list[np.ndarray]]:
    """SegTrack-v2: a single-object video (GroundTruth/<video>/*.png) and a two-object one (subfolders 1/, 2/:
    the object's left and right halves); frames are .png, masks 0/255."""
    truth = {}
    for v, name in enumerate(["bird", "penguin"]):
        frames, masks = single_object_video(N_FRAMES, seed=v)
        for t, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
            stem = f"{name}_{t:05d}"
            save(root / "JPEGImages" / name / f"{stem}.png", frame)
            if v == 0:
                save(root / "GroundTruth" / name / f"{stem}.png", mask.astype(np.uint8) * 255)
            else:
                cut = np.argwhere(mask)[:, 1].mean()
                left = mask & (np.arange(mask.shape[1]) < cut)
                save(root / "GroundTruth" / name / "1" / f"{stem}.png", left.astype(np.uint8) * 255)
                save(root / "GroundTruth" / name / "2" / f"{stem}.png", (mask & ~left).astype(np.uint8) * 255)
        truth[name] = masks
    return truth


def write_fbms(root) -> dict[str, list[np.ndarray]]:
    """FBMS-59: Testset/<video>/ frames, ground truth for frames 0 and 4 only (pgm, grey levels)."""
    truth = {}
    for v, name in enumerate(["cars1", "people2"]):
        frames, masks = single_object_video(N_FRAMES, seed=v)
        for t, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
            save(root / "Testset" / name / f"{name}_{t + 1:02d}.jpg", frame)
            if t in (0, 4):
                save(
                    root / "Testset" / name / "GroundTruth" / f"{name}_{t + 1:02d}_gt.pgm",
                    mask.astype(np.uint8) * 200,
                )
        truth[name] = masks
    return truth


LAYOUTS = {"davis2016": write_davis2016, "segtrackv2": write_segtrack, "fbms59": write_fbms}


def dataset(name, root):
    return load_config(name, "sslvos", [f"dataset.root={root}", "backbone.random_init=true"])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layouts_list_videos_and_merge_objects_into_one_foreground(name, tmp_path):
    truth = LAYOUTS[name](tmp_path)
    cfg = dataset(name, tmp_path)
    videos = list_videos(cfg.dataset)
    expected = [n for n in truth if n != "unlisted"]  # DAVIS-2016: only the 2016 list's videos
    assert [v.name for v in videos] == expected
    assert evaluation_protocol(cfg.dataset) == "foreground"
    for video in videos:
        assert len(video.frames) == N_FRAMES
        ids, void = video_truth(cfg.dataset, video)
        assert set(np.unique(ids)) <= {0, 1}
        annotated = range(N_FRAMES) if name != "fbms59" else (0, 4)
        for t in range(N_FRAMES):
            if t in annotated:
                assert np.array_equal(ids[t] == 1, truth[video.name][t]), (video.name, t)
                assert void is None or not void[t].any()
            else:  # FBMS-59's unannotated frames count nowhere
                assert void[t].all()


def write_tracks(run_dir, cfg, masks_of) -> None:
    """A ytvis.json with one track per video: masks_of(video name, t) -> bool mask."""
    videos, annotations = [], []
    for video in list_videos(cfg.dataset):
        segs = [encode_mask(masks_of(video.name, t)) for t in range(len(video.frames))]
        videos.append({"id": video.id, "name": video.name})
        annotations.append({"id": video.id, "video_id": video.id, "segmentations": segs})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "ytvis.json").write_text(json.dumps({"videos": videos, "annotations": annotations}))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_davis2016_protocol_scores_truth_1_and_averages_sequences(name, tmp_path):
    truth = LAYOUTS[name](tmp_path / "data")
    cfg = dataset(name, tmp_path / "data")
    write_tracks(tmp_path / "perfect", cfg, lambda v, t: truth[v][t])
    metrics = evaluate.evaluate_video(cfg, tmp_path / "perfect")
    assert metrics["J"] == metrics["F"] == 1.0 and metrics["protocol"] == "DAVIS-2016"
    # First video right, second video's prediction empty: J is 0 on its annotated frames, the mean 0.5.
    first = list(truth)[0]
    write_tracks(
        tmp_path / "half", cfg, lambda v, t: truth[v][t] if v == first else np.zeros_like(truth[v][t])
    )
    metrics = evaluate.evaluate_video(cfg, tmp_path / "half")
    assert metrics["J"] == pytest.approx(0.5) and metrics["F"] == pytest.approx(0.5)
    assert metrics["videos"][first]["J"] == 1.0
    assert metrics["videos"][first]["frames"] == (2 if name == "fbms59" else N_FRAMES)


def test_foreground_jf_is_the_frame_mean_iou_of_merged_masks():
    gt = np.zeros((2, 10, 10), np.int64)
    gt[:, 2:6, 2:6] = 1
    gt[:, 2:6, 6:8] = 2  # a second object: merged
    pred = np.zeros_like(gt)
    pred[0, 2:6, 2:8] = 5  # frame 0 exact (any id)
    pred[1, 2:6, 2:5] = 1  # frame 1: 12 of 24 pixels
    scores = foreground_jf(gt, pred)
    assert scores["J"] == pytest.approx((1.0 + 12 / 24) / 2) and scores["frames"] == 2
    void = np.zeros(gt.shape, bool)
    void[1] = True  # frame 1 not annotated
    assert foreground_jf(gt, pred, void)["J"] == 1.0


def test_missing_ground_truth_is_named(tmp_path):
    write_segtrack(tmp_path)
    (tmp_path / "GroundTruth" / "bird" / "bird_00003.png").unlink()
    cfg = dataset("segtrackv2", tmp_path)
    write_tracks(tmp_path / "run", cfg, lambda v, t: np.zeros((64, 96), bool))
    with pytest.raises(DatasetError, match="bird"):
        evaluate.evaluate_video(cfg, tmp_path / "run")
