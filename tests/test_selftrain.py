"""Self-training end to end on generated data with a tiny schedule; resume; detector loading; bad inputs."""

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pipeline import load_detector, selftrain
from pipeline.config import load_config
from pipeline.driver import EXIT_AFTER_SHARDS
from pipeline.selftrain import run
from stages import train
from stages.export import coco_file, mask_annotation
from tests.processes import run_pipeline
from tests.synthetic import object_image, write_image_folder

pytestmark = pytest.mark.usefixtures("ray_local")

TINY = [
    "run.workers=2",
    "run.shard_size=2",  # three shards of the six images
    "backbone.arch=test_vit_tiny",
    "backbone.random_init=true",
    "method.resize=96",
    "train.model=mask_rcnn_R_50_FPN",
    "train.rounds=2",
    "train.score_thresh=[0.0]",  # keep every prediction: round 1 must see re-labelled data
    "train.detections_per_image=5",
]


def schedule(iters):
    return (
        f"train.opts=[SOLVER.MAX_ITER, {iters}, SOLVER.STEPS, [2], SOLVER.CHECKPOINT_PERIOD, 2, "
        "SOLVER.WARMUP_ITERS, 1, INPUT.MIN_SIZE_TRAIN, [96], INPUT.MAX_SIZE_TRAIN, 128, "
        "INPUT.MIN_SIZE_TEST, 96, INPUT.MAX_SIZE_TEST, 128]"
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, 6)
    return root


def config(images, out, extra=(), iters=3):
    overrides = [f"dataset.root={images}", f"run.out_dir={out}", *TINY, schedule(iters), *extra]
    return load_config("imagefolder", "maskcut", overrides, preset="cpu-tiny")


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = config(images, out)
    return cfg, run(cfg)


def test_two_rounds_write_detector_directories(trained):
    _, last = trained
    root = last.parent
    for r in (0, 1):
        d = root / f"round{r}"
        assert (
            (d / "model_final.pth").is_file() and (d / "config.yaml").is_file() and (d / "log.txt").is_file()
        )
        assert not list(d.glob("model_0*.pth"))  # only the final weights stay
        meta = json.loads((d / "metadata.json").read_text())
        assert (meta["round"], meta["dataset"], meta["method"]) == (r, "imagefolder", "maskcut")
        summary = json.loads((d / "summary.json").read_text())
        assert summary["round"] == r and summary["labels_in"] > 0
    relabel = json.loads((root / "round1" / "relabel.json").read_text())
    assert relabel["predictions_kept"] > 0
    labels1 = json.loads((root / "round1" / "labels.json").read_text())
    assert any("score" in a for a in labels1["annotations"])  # round 1 trains on the detector's masks


def test_finished_rounds_are_not_retrained(trained):
    cfg, last = trained
    weights = [last.parent / f"round{r}" / "model_final.pth" for r in (0, 1)]
    before = [w.stat().st_mtime_ns for w in weights]
    assert run(cfg) == last
    assert [w.stat().st_mtime_ns for w in weights] == before


def test_a_detector_directory_loads_in_one_call_and_predicts(trained):
    _, last = trained
    det = load_detector(last, device="cpu")
    out = det(object_image(96, 128, (20, 30, 70, 90)))
    n = len(out.scores)
    assert out.boxes.shape == (n, 4) and out.masks.shape == (n, 96, 128) and out.masks.dtype == bool
    assert np.all(np.diff(out.scores) <= 0)  # best first


class Interrupted(Exception):
    pass


def test_an_interrupted_round_resumes_from_its_last_checkpoint(images, trained, monkeypatch):
    from detectron2.engine import HookBase

    cfg, last = trained
    # Another selftrain run on the same pseudo-labels, 5 iterations: checkpoint after iteration 1, stop at 2.
    cfg2 = config(images, cfg.run.out_dir, ["train.rounds=1"], iters=5)
    build, starts = train.build_trainer, []

    class StopAtIteration2(HookBase):
        def after_step(self):
            if self.trainer.iter == 2:
                raise Interrupted

    def interrupted_trainer(d2cfg):
        trainer = build(d2cfg)
        trainer.register_hooks([StopAtIteration2()])
        return trainer

    monkeypatch.setattr(train, "build_trainer", interrupted_trainer)
    with pytest.raises(Interrupted):
        run(cfg2)

    def recording_trainer(d2cfg):
        trainer = build(d2cfg)
        original = trainer.resume_or_load

        def resume_or_load(resume):
            original(resume=resume)
            starts.append(trainer.start_iter)

        trainer.resume_or_load = resume_or_load
        return trainer

    monkeypatch.setattr(train, "build_trainer", recording_trainer)
    round0 = run(cfg2)
    assert starts == [2]  # resumed after the checkpoint of iteration 1, not from scratch
    assert (round0 / "summary.json").exists()


def test_killed_relabelling_resumes_and_ends_identical(images, trained, tmp_path, monkeypatch):
    cfg, last = trained
    # The finished run without round 1, elsewhere: the next run re-labels with round 0's detector.
    root, out = last.parent, tmp_path / "runs"
    shutil.copytree(Path(cfg.run.out_dir) / "pseudolabels", out / "pseudolabels")
    shutil.copytree(root, out / "selftrain" / root.name, ignore=shutil.ignore_patterns("round1"))
    args = ["--dataset", "imagefolder", "--method", "maskcut", "--preset", "cpu-tiny"]
    args += [f"dataset.root={images}", f"run.out_dir={out}", *TINY, schedule(3)]
    assert run_pipeline("selftrain", args, {EXIT_AFTER_SHARDS: "1"}) == -signal.SIGKILL
    round1 = out / "selftrain" / root.name / "round1"
    assert len(list((round1 / "relabel").glob("shard-*.json"))) == 1  # killed after its first shard
    assert not (round1 / "labels.json").exists()

    def stop_before_training(*args):  # what is tested ends with the labels; training would only cost time
        raise Interrupted

    monkeypatch.setattr(selftrain, "train_round", stop_before_training)
    with pytest.raises(Interrupted):
        run(config(images, out))
    assert (round1 / "labels.json").read_bytes() == (last / "labels.json").read_bytes()
    assert json.loads((round1 / "relabel.json").read_text()) == json.loads(
        (last / "relabel.json").read_text()
    )


def test_bad_label_files_fail_before_training(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    images = [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}]
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(coco_file(images, [])))
    with pytest.raises(train.TrainingError, match="no annotations"):
        train.check_labels(empty, str(tmp_path), {"a.jpg"})
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(coco_file(images, [mask_annotation(np.ones((8, 8), bool), 1)])))
    with pytest.raises(train.TrainingError, match="does not belong to this dataset"):
        train.check_labels(labels, str(tmp_path), {"b.jpg"})
    (tmp_path / "a.jpg").unlink()
    with pytest.raises(train.TrainingError, match="missing"):
        train.check_labels(labels, str(tmp_path), {"a.jpg"})


def test_dino_resnet50_converts_to_every_detectron2_backbone_weight(tmp_path):
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_resnet_backbone

    state = torchvision.models.resnet50().state_dict()
    torch.save(state, tmp_path / "dino_resnet50_pretrain.pth")
    converted = train.convert_resnet50(tmp_path / "dino_resnet50_pretrain.pth")
    cfg = get_cfg()
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    expected = {
        f"backbone.bottom_up.{k}" for k in backbone.state_dict() if not k.endswith("num_batches_tracked")
    }
    assert set(converted) == expected
    d2 = backbone.state_dict()
    assert torch.equal(
        converted["backbone.bottom_up.res3.0.shortcut.norm.running_var"],
        state["layer2.0.downsample.1.running_var"],
    )
    assert converted["backbone.bottom_up.res5.2.conv3.weight"].shape == d2["res5.2.conv3.weight"].shape


def test_rounds_are_evaluated_only_where_there_is_ground_truth(images, trained, monkeypatch):
    import dataclasses

    from pipeline.config import DatasetConfig
    from stages import datasets

    cfg, last = trained
    assert selftrain.evaluate_round(cfg, last) == {}  # an image folder has nothing to evaluate against
    # The round's own labels as ground truth: a COCO dataset over the same images.
    coco = DatasetConfig("selftrain-gt", "coco", str(images), str(last / "labels.json"), None)
    built = []
    monkeypatch.setattr(
        selftrain, "ground_truth_coco", lambda d: built.append(d) or datasets.ground_truth_coco(d)
    )
    metrics = selftrain.evaluate_round(dataclasses.replace(cfg, dataset=coco), last)
    assert len(built) == 1  # built once per round, then handed to the evaluation
    assert metrics["corloc"]["images"] == 6 and 0.0 <= metrics["corloc"]["corloc"] <= 1.0
    assert set(metrics["ap"]) >= {"bbox", "segm"}
    assert (last / "eval" / "selftrain-gt" / "metrics.json").is_file()
