"""SOLV as a video method through the real pipeline: make train-solv's training (TensorBoard scalars, resume
to the same state), finding the trained model (a clear error without one), pseudo-label tracks and video
metrics on generated videos, and the config sections that shape each run directory."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from pipeline import evaluate, train_solv
from pipeline.config import ConfigError, load_config, replace
from pipeline.pseudolabels import run as pseudolabels
from pipeline.resolve import resolve
from pipeline.runs import RunDir, RunError
from stages.data.videos import list_videos, video_ground_truth
from stages.features.backbone import Backbone

# A SOLV small enough to train on generated 64x96 videos in seconds: 8x12 patches of the toy ViT (48-d),
# 3 slots of 32, windows of 3 frames, half the tokens dropped, merging on from the start.
TINY = [
    "solv_model.size=[64, 96]",
    "solv_model.num_slots=3",
    "solv_model.slot_dim=32",
    "solv_model.context=1",
    "solv_model.temporal_layers=1",
    "solv_model.temporal_heads=4",
    "solv_model.decoder_hidden=64",
    "solv_model.decoder_layers=3",
    "solv_model.lr=2.0e-3",
    "solv_model.batch_size=8",
    "solv_model.merge_periods=1",
    "solv_model.merge_min_slots=2",
    "solv_model.checkpoint_every=1",
]


def solv_config(videos, weights, out, extra=()):
    overrides = [
        f"dataset.root={videos}",
        f"run.out_dir={out}",
        "backbone.arch=test_vit_tiny",
        f"backbone.weights={weights}",
        "run.workers=2",
        *TINY,
        *extra,
    ]
    return load_config("davis17", "solv", overrides)


def test_without_a_trained_model_a_run_says_how_to_train_one(davis_videos, random_vit_weights, tmp_path):
    cfg = solv_config(davis_videos, random_vit_weights, tmp_path)
    with pytest.raises(RunError, match=r"make train-solv DATASET=davis17"):
        resolve(cfg)
    with pytest.raises(RunError, match=r"solv_model.checkpoint.*no such file"):
        resolve(replace(cfg, **{"solv_model.checkpoint": str(tmp_path / "missing.pth")}))
    with pytest.raises(RunError, match=r"--method solv"):
        train_solv.train(
            load_config("davis17", "ba", [f"dataset.root={davis_videos}", f"run.out_dir={tmp_path}"])
        )


def test_bad_model_settings_name_their_key():
    with pytest.raises(ConfigError, match=r"'solv_model.slot_dim'.*multiple of temporal_heads"):
        load_config("demo-video", "solv", ["solv_model.slot_dim=60"])
    with pytest.raises(ConfigError, match=r"'solv_model.token_drop'"):
        load_config("demo-video", "solv", ["solv_model.token_drop=1.0"])
    with pytest.raises(ConfigError, match=r"'solv_model.size'"):
        load_config("demo-video", "solv", ["solv_model.size=[64]"])


def test_each_video_method_hashes_only_the_sections_it_uses(davis_videos, random_vit_weights, tmp_path):
    ba = load_config("davis17", "ba", [f"dataset.root={davis_videos}"])
    solv = solv_config(davis_videos, random_vit_weights, tmp_path)
    for cfg, own, other in (
        (ba, "correlator.heads", "solv_model.num_slots"),
        (solv, "solv_model.num_slots", "correlator.heads"),
    ):
        same = RunDir.for_config(cfg, "pseudolabels")
        assert RunDir.for_config(replace(cfg, **{other: 4}), "pseudolabels") == same
        assert RunDir.for_config(replace(cfg, **{own: 4}), "pseudolabels") != same
    # SOLV's trained model: its own section shapes it, the method's inference settings do not
    model_dir = RunDir.for_config(solv, "solv_model")
    assert RunDir.for_config(replace(solv, **{"method.background": "none"}), "solv_model") == model_dir
    assert RunDir.for_config(replace(solv, **{"solv_model.lr": 1e-4}), "solv_model") != model_dir
    assert RunDir.for_config(replace(solv, **{"solv_model.checkpoint_every": 7}), "solv_model") == model_dir


def _stop_after(monkeypatch, steps: int):
    """Training's batches run out after ``steps`` batches (an interrupted run: it checkpoints and returns)."""
    original = train_solv.clip_batches

    def limited(*args, **kwargs):
        source = original(*args, **kwargs)
        for _ in range(steps):
            yield next(source)

    monkeypatch.setattr(train_solv, "clip_batches", limited)


def test_training_resumes_to_the_state_of_an_uninterrupted_run(
    davis_videos, random_vit_weights, tmp_path, monkeypatch
):
    steps = ["solv_model.steps=4"]
    whole = train_solv.train(solv_config(davis_videos, random_vit_weights, tmp_path / "whole", steps))
    interrupted_cfg = solv_config(davis_videos, random_vit_weights, tmp_path / "interrupted", steps)
    with monkeypatch.context() as m:
        _stop_after(m, 2)
        path = train_solv.train(interrupted_cfg)
    assert torch.load(path, weights_only=True)["step"] == 2
    assert train_solv.train(interrupted_cfg) == path  # resumes in the same run directory
    a, b = torch.load(whole, weights_only=True), torch.load(path, weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # TensorBoard: loss, learning rate and merged slots, one point per step, the resumed steps once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(Path(path).parent / "tensorboard"))
    board.Reload()
    assert {"loss", "learning_rate", "slots/merged", "slots/merge_probability"} <= set(
        board.Tags()["scalars"]
    )
    assert [e.step for e in board.Scalars("loss")] == [1, 2, 3, 4]
    assert all(2 <= e.value <= 3 for e in board.Scalars("slots/merged"))  # merge_min_slots 2, 3 slots
    lrs = [e.value for e in board.Scalars("learning_rate")]
    assert lrs[0] > lrs[-1] > 0  # warm-up of int(4 * 0.05) = 0 steps, then exponential decay


@pytest.mark.usefixtures("ray_local")
def test_a_trained_model_gives_tracks_and_metrics_through_the_pipeline(
    davis_videos, random_vit_weights, tmp_path
):
    # 40 steps do not separate the squares (tests/test_solv.py trains a model that does, on feature maps);
    # with every track kept as an object, each square must still be one track over all its frames.
    cfg = solv_config(
        davis_videos, random_vit_weights, tmp_path, ["solv_model.steps=40", "method.background=none"]
    )
    checkpoint = train_solv.train(cfg)
    assert resolve(cfg).solv_model.checkpoint == str(checkpoint)
    labels = pseudolabels(cfg)
    run_dir = labels.parent
    coco = COCO(str(labels))
    assert len(coco.getImgIds()) == 12 and coco.getAnnIds()
    tracks = json.loads((run_dir / "ytvis.json").read_text())
    assert {v["name"] for v in tracks["videos"]} == {"video0", "video1"}
    assert all(len(t["segmentations"]) == 6 for t in tracks["annotations"])
    for v in list_videos(cfg.dataset):
        gt = video_ground_truth(cfg.dataset, v)
        pred = evaluate.predicted_ids(tracks, v.id, gt.shape)
        assert (pred > 0).all()  # no background: every pixel of every frame belongs to a track
        for obj in (1, 2):  # one track covers most of each moving square in every frame, the same one
            owners = {np.bincount(pred[t][gt[t] == obj]).argmax() for t in range(len(gt))}
            assert len(owners) == 1, (v.name, obj, owners)
    metrics = evaluate.evaluate_video(cfg)
    assert -1 <= metrics["FG-ARI"] <= 1 and 0 < metrics["mIoU"] <= 1 and 0 < metrics["J&F"] <= 1
    assert json.loads((run_dir / "metrics.json").read_text())["mIoU"] == metrics["mIoU"]
    mtimes = [p.stat().st_mtime_ns for p in run_dir.glob("shards/*.json")]
    assert pseudolabels(cfg) == labels  # finished videos are kept
    assert [p.stat().st_mtime_ns for p in run_dir.glob("shards/*.json")] == mtimes


def test_solv_features_are_the_last_block_output_before_the_final_norm_without_cls():
    from stages.video.solv_method import frame_features

    backbone = Backbone("test_vit_tiny", None, "cpu", random_init=True)
    captured = {}
    hook = backbone.model.blocks[-1].register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    rgb = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    feats, grid = frame_features(backbone, list(rgb), [64, 64], batch_size=2)
    hook.remove()
    assert grid == (8, 8) and feats.shape == (2, 64, 48)
    # the block's own output (timm's forward), CLS first: SOLV reads the patches, not normalised
    assert torch.allclose(feats, captured["out"][:, 1:], atol=1e-5)
    assert not torch.allclose(feats, backbone.model.norm(captured["out"])[:, 1:], atol=1e-2)
