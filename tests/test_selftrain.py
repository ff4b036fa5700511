"""Self-training end to end on generated data with a tiny schedule; resume; detector loading; bad inputs."""

import json
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline import load_detector, selftrain
from pipeline.config import load_config
from pipeline.driver import EXIT_AFTER_SHARDS
from pipeline.selftrain import run
from stages.common.export import coco_file, mask_annotation
from stages.common.io import BadImage
from stages.detection import train
from tests.processes import run_pipeline
from tests.synthetic import box_iou, object_image, write_image_folder

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
        labels = json.loads((d / "labels.json").read_text())["annotations"]
        assert summary["round"] == r and summary["labels_in"] == len(labels) > 0
    relabel = json.loads((root / "round1" / "relabel.json").read_text())
    labels1 = json.loads((root / "round1" / "labels.json").read_text())
    assert any("score" in a for a in labels1["annotations"])  # round 1 trains on the detector's masks
    assert relabel["predictions_kept"] == sum("score" in a for a in labels1["annotations"]) > 0
    assert relabel["previous_kept"] == sum("score" not in a for a in labels1["annotations"])


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
    assert n > 0  # SCORE_THRESH_TEST is 0: even a 3-iteration detector returns its best boxes
    assert out.boxes.shape == (n, 4) and out.masks.shape == (n, 96, 128) and out.masks.dtype == bool
    assert np.all((out.boxes >= 0) & (out.boxes <= [128, 96, 128, 96]))  # xyxy inside the image
    assert np.all(np.diff(out.scores) <= 0)  # best first
    # A PIL image is the same image; anything else (a batch, say) is one BadImage saying what is accepted.
    pil = det(Image.fromarray(object_image(96, 128, (20, 30, 70, 90))))
    assert np.array_equal(pil.boxes, out.boxes) and np.array_equal(pil.scores, out.scores)
    with pytest.raises(BadImage, match="expected one image: a file path, a PIL image or an .* got list"):
        det([object_image(96, 128, (20, 30, 70, 90))] * 2)


def test_a_path_that_is_not_a_detector_is_one_user_error_line(trained, tmp_path, capsys):
    from pipeline import cli

    cfg, last = trained
    root = last.parent  # the self-training run: its rounds are the detectors
    (tmp_path / "labels.json").write_text("{}")
    unfinished = tmp_path / "run" / "round0"  # a round still training, or stopped: labels, no final weights
    unfinished.mkdir(parents=True)
    for name in ("labels.json", "config.yaml", "model_0000009.pth"):
        (unfinished / name).write_text("")
    cases = {
        unfinished: f"{unfinished} is not a detector directory: no model_final.pth; it is a self-training "
        "round whose training has not finished (run make selftrain again)",
        unfinished.parent: f"{unfinished.parent} is not a detector directory: no model_final.pth or "
        "config.yaml; it is a self-training run none of whose rounds has finished training",
        root: f"{root} is not a detector directory: no model_final.pth; it holds the rounds round0, round1: "
        f"give one of them, e.g. {root / 'round1'}",
        tmp_path / "nothere": f"{tmp_path / 'nothere'}: no such detector directory",
        tmp_path / "labels.json": f"{tmp_path / 'labels.json'} is a file, not a detector directory",
    }
    for model, message in cases.items():
        argv = ["eval", "--dataset", "imagefolder", "--model", str(model), f"dataset.root={cfg.dataset.root}"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {message}")
    with pytest.raises(FileNotFoundError, match="no such detector directory"):  # the Python API's error
        load_detector(tmp_path / "nothere")


class Interrupted(Exception):
    pass


def test_an_interrupted_round_resumes_from_its_last_checkpoint(images, trained, monkeypatch, capsys):
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
    capsys.readouterr()
    round0 = run(cfg2)
    assert starts == [2]  # resumed after the checkpoint of iteration 1, not from scratch
    assert "round0: resuming training from model_0000001.pth (iterations after" in capsys.readouterr().err
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


def _randomised_resnet50(seed: int) -> torchvision.models.ResNet:
    """A torchvision ResNet-50 whose BatchNorm affine parameters and running statistics are all different
    (a fresh model has ones and zeros everywhere, so swapped tensors of the same shape would not show)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.empty(n).uniform_(0.5, 1.5)
            module.bias.data = torch.randn(n) * 0.1
            module.running_mean = torch.randn(n) * 0.1
            module.running_var = torch.empty(n).uniform_(0.5, 2.0)
    return model.eval()


def test_converted_dino_resnet50_computes_what_torchvision_computes(tmp_path):
    # Independent of the name mapping: the converted weights in detectron2's ResNet must give torchvision's
    # stage outputs (res2..res5 = layer1..layer4) on the same image, tensor for tensor.
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_resnet_backbone

    reference = _randomised_resnet50(seed=5)
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)  # DDP-style names
    converted = train.convert_resnet50(path)

    cfg = get_cfg()
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    prefix = "backbone.bottom_up."
    assert all(k.startswith(prefix) for k in converted)
    missing, unexpected = backbone.load_state_dict({k[len(prefix) :]: v for k, v in converted.items()}, False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)

    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = backbone(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for stage in range(1, 5):
            y = getattr(reference, f"layer{stage}")(y)
            want = got[f"res{stage + 1}"]
            assert want.shape == y.shape
            assert (want - y).abs().max() <= 1e-4 * y.abs().max(), f"res{stage + 1}"


def planted_ground_truth(images) -> tuple[dict, dict[int, list[int]]]:
    """COCO ground truth of write_image_folder's images written by hand, and each image's box [x0, y0, x1,
    y1]: image i shows one red rectangle, rows 20..63 and columns 10 + 6i .. 59 + 6i, nothing else."""
    names = sorted(
        p.relative_to(images).as_posix() for p in images.rglob("*") if p.suffix in (".png", ".jpg")
    )
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "red box"}]}
    boxes = {}
    for image_id, name in enumerate(names, 1):
        i = int(name.split("img")[1].split(".")[0])
        x0, y0, x1, y1 = boxes[image_id] = [10 + 6 * i, 20, 60 + 6 * i, 64]
        gt["images"].append({"id": image_id, "file_name": name, "width": 128, "height": 96})
        gt["annotations"].append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            }
        )
    return gt, boxes


def test_rounds_are_evaluated_only_where_there_is_ground_truth(images, trained, monkeypatch, tmp_path):
    import dataclasses

    from stages.data import datasets
    from stages.data.base import DatasetConfig

    cfg, last = trained
    assert selftrain.evaluate_round(cfg, last) == {}  # an image folder has nothing to evaluate against
    # Ground truth written by hand (the planted rectangles), not the round's own labels.
    gt, truth = planted_ground_truth(images)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco = DatasetConfig("selftrain-gt", "coco", str(images), str(tmp_path / "gt.json"), None, "all")
    built = []
    monkeypatch.setattr(
        selftrain, "ground_truth_coco", lambda d: built.append(d) or datasets.ground_truth_coco(d)
    )
    metrics = selftrain.evaluate_round(dataclasses.replace(cfg, dataset=coco), last)
    assert len(built) == 1  # built once per round, then handed to the evaluation
    assert set(metrics["ap"]) >= {"bbox", "segm"}
    assert (last / "eval" / "selftrain-gt" / "metrics.json").is_file()
    # CorLoc recomputed here from the saved predictions: each image's best-scored box against its rectangle.
    (predictions_dir,) = (last / "eval" / "selftrain-gt").glob("predictions-*")
    shards = predictions_dir.glob("*.json")
    predictions = [a for f in shards for a in json.loads(f.read_text())["annotations"]]
    hits, any_hit = 0, False
    for image_id, box in truth.items():
        mine = sorted((a for a in predictions if a["image_id"] == image_id), key=lambda a: -a["score"])
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["det_bbox"] for a in mine)]
        hits += bool(xyxy) and box_iou(xyxy[0], box) >= 0.5
        any_hit |= any(box_iou(b, box) >= 0.5 for b in xyxy)
    assert metrics["corloc"] == {"corloc": hits / 6, "hits": hits, "images": 6, "absent": 0}
    assert (metrics["ap"]["bbox"]["AP50"] > 0) == any_hit  # AP50 is 0 exactly when no box reaches IoU 0.5


# ---------------------------------------------------------------------------------------------------------
# Per-round settings (SPEC "CutLER training"): what round 0 and the self-training rounds are configured with,
# and that the trainer really trains that way.


def reference_train_config(model="cascade_mask_rcnn_R_50_FPN"):
    """The reference schedule (no tiny preset): configs/ defaults with only the model chosen."""
    return load_config("demo", "maskcut", [f"train.model={model}"]).train


@pytest.mark.parametrize(
    "model, heads",
    [("cascade_mask_rcnn_R_50_FPN", "DropLossCascadeROIHeads"), ("mask_rcnn_R_50_FPN", "DropLossROIHeads")],
)
def test_round_settings_follow_the_reference(model, heads, tmp_path):
    # The lr, RPN and solver values of each round are in tests/test_detectron_config.py; here what every
    # round shares or changes: the heads, DropLoss and copy-paste, for rounds 0, 1 and 2.
    rounds = [train.detectron_cfg(reference_train_config(model), r, tmp_path, "", "cpu") for r in range(3)]
    for r, c in enumerate(rounds):
        assert c.MODEL.ROI_HEADS.NAME == heads  # the same registered heads in every round
        assert c.MODEL.ROI_HEADS.DROPLOSS.ENABLED == (r == 0)  # DropLoss in round 0 only ...
        assert c.MODEL.ROI_HEADS.DROPLOSS.IOU_THRESH == 0.01  # ... at IoU 0.01
        assert c.INPUT.COPY_PASTE.ENABLED
        assert tuple(c.INPUT.COPY_PASTE.RATIO_RANGE) == ((0.3, 1.0) if r == 0 else (0.5, 1.0))
        assert c.SOLVER.BASE_LR == (0.01 if r == 0 else 0.005)
        assert c.SOLVER.MAX_ITER == (160000 if r == 0 else 80000)
        assert c.SOLVER.IMS_PER_BATCH == 16


def test_a_ground_truth_that_annotates_other_images_gets_its_own_predictions(images, trained, tmp_path):
    cfg, last = trained
    gt, _ = planted_ground_truth(images)
    model = tmp_path / "round"
    shutil.copytree(last, model, ignore=shutil.ignore_patterns("eval"))

    import dataclasses

    import pipeline.evaluate
    from stages.data.base import DatasetConfig

    def evaluate(annotated: int) -> dict:
        part = {**gt, "annotations": gt["annotations"][:annotated]}  # the others: images without annotations
        path = tmp_path / f"gt{annotated}.json"
        path.write_text(json.dumps(part))
        coco = DatasetConfig("part", "coco", str(images), str(path), None, "annotated")
        return pipeline.evaluate.evaluate_detector(model, dataclasses.replace(cfg, dataset=coco))

    first, second = evaluate(3), evaluate(6)  # a second file annotating three more images
    assert (first["images_scored"], second["images_scored"]) == (3, 6)
    assert second["corloc"]["images"] == 6
    predicted = sorted(
        {
            im["id"]
            for f in (model / "eval" / "part").glob("predictions-*/*.json")
            for im in json.loads(f.read_text())["images"]
        }
    )
    assert predicted == [1, 2, 3, 4, 5, 6]  # the detector ran on the three new images, not on none of them
    assert len(list((model / "eval" / "part").glob("predictions-*"))) == 2
    assert evaluate(3) == first  # and the first set's predictions are still its own


def test_score_thresholds_are_0_7_then_0_65():
    t = reference_train_config()
    assert [t.thresh(r) for r in (1, 2, 3, 4)] == [0.7, 0.65, 0.65, 0.65]


@pytest.mark.parametrize("r", [0, 1])
def test_the_trainer_trains_on_copy_paste_batches_with_the_rounds_settings(trained, images, r, monkeypatch):
    # One real training iteration of round r's trainer: every batch goes through copy-paste with the round's
    # ratio range, and DropLoss weighs the classification loss in round 0 only.
    import stages.detection.copy_paste
    from stages.detection.droploss import DropLossFastRCNNOutputLayers

    cfg, last = trained
    d2cfg = train.detectron_cfg(cfg.train, r, last.parent / f"one-iteration-{r}", "", "cpu")
    d2cfg.SOLVER.MAX_ITER = 1
    d2cfg.DATASETS.TRAIN = (f"one-iteration-{r}",)
    Path(d2cfg.OUTPUT_DIR).mkdir()
    train.register_labels(d2cfg.DATASETS.TRAIN[0], last.parent / "round0" / "labels.json", str(images))
    pasted, weighted = [], []
    paste = stages.detection.copy_paste.copy_paste
    monkeypatch.setattr(
        stages.detection.copy_paste,
        "copy_paste",
        lambda b, ratio, *a: pasted.append(ratio) or paste(b, ratio, *a),
    )
    weights = DropLossFastRCNNOutputLayers.proposal_weights
    monkeypatch.setattr(
        DropLossFastRCNNOutputLayers, "proposal_weights", lambda s, *a: weighted.append(1) or weights(s, *a)
    )
    trainer = train.build_trainer(d2cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert pasted == [(0.3, 1.0) if r == 0 else (0.5, 1.0)]  # the one batch, pasted at the round's scale
    assert bool(weighted) == (r == 0)
    predictor = trainer.model.roi_heads.box_predictor
    assert getattr(predictor, "droploss_enabled", False) == (r == 0)


def test_relabelling_keeps_what_the_rule_says(trained):
    # Round 1's labels recomputed here from the saved predictions and round 0's labels, with mask IoU by hand.
    from pycocotools import mask as mask_utils

    cfg, last = trained
    root = last.parent
    shards = (root / "round1" / "relabel").glob("*.json")
    predictions = [a for f in shards for a in json.loads(f.read_text())["annotations"]]
    old = json.loads((root / "round0" / "labels.json").read_text())["annotations"]

    def decode(a):
        return mask_utils.decode({**a["segmentation"], "counts": a["segmentation"]["counts"].encode()})

    kept = [p for p in predictions if p["score"] >= cfg.train.thresh(1)]
    survivors = 0
    for a in old:
        mask = decode(a).astype(bool)
        ious = [
            (mask & decode(p).astype(bool)).sum() / (mask | decode(p).astype(bool)).sum()
            for p in kept
            if p["image_id"] == a["image_id"]
        ]
        survivors += max(ious, default=0.0) < 0.5
    relabel = json.loads((root / "round1" / "relabel.json").read_text())
    assert relabel == {
        "predictions_kept": len(kept),
        "previous_kept": survivors,
        "threshold": cfg.train.thresh(1),
    }
    assert len(kept) > 0


def test_an_interrupted_self_training_round_resumes_from_its_own_checkpoint(trained, tmp_path, monkeypatch):
    from detectron2.engine import HookBase

    from pipeline.config import replace

    cfg, last = trained
    # A copy of the finished two-round run whose round 1 has its labels but was never trained.
    runs = tmp_path / "runs"
    (pseudo,) = (Path(cfg.run.out_dir) / "pseudolabels").iterdir()
    shutil.copytree(pseudo, runs / "pseudolabels" / pseudo.name)
    shutil.copytree(last.parent, runs / "selftrain" / last.parent.name)
    round1 = runs / "selftrain" / last.parent.name / "round1"
    for path in round1.iterdir():
        if path.name not in ("labels.json", "relabel.json"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    cfg = replace(cfg, **{"run.out_dir": str(runs)})
    build = train.build_trainer

    class StopAfterCheckpoint(HookBase):  # registered after the checkpointer: it saved iteration 1 first
        def after_step(self):
            if self.trainer.iter == 1:
                raise Interrupted

    def interrupted_trainer(d2cfg):
        trainer = build(d2cfg)
        trainer.register_hooks([StopAfterCheckpoint()])
        return trainer

    monkeypatch.setattr(train, "build_trainer", interrupted_trainer)
    with pytest.raises(Interrupted):
        run(cfg)
    own = torch.load(round1 / "model_0000001.pth", weights_only=False)["model"]
    previous = torch.load(round1.parent / "round0" / "model_final.pth", weights_only=False)["model"]
    assert any(not torch.equal(own[k], previous[k]) for k in own)  # round 1's two iterations changed it

    resumed = {}

    class RecordStart(HookBase):  # what training starts from, after everything train() loaded
        def before_train(self):
            resumed["start"] = self.trainer.iter
            resumed["weights"] = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}

    def recording_trainer(d2cfg):
        trainer = build(d2cfg)
        trainer.register_hooks([RecordStart()])
        return trainer

    monkeypatch.setattr(train, "build_trainer", recording_trainer)
    assert run(cfg) == round1
    assert resumed["start"] == 2  # after its own checkpoint of iteration 1 (of 0..2), not from scratch
    assert all(torch.equal(resumed["weights"][k], own[k]) for k in own)  # its weights, not round 0's
    assert (round1 / "summary.json").exists()


def test_a_rounds_detector_file_keeps_the_weights_without_the_trainer_state(trained):
    _, last = trained
    for r in (0, 1):
        checkpoint = torch.load(last.parent / f"round{r}" / "model_final.pth", weights_only=True)
        assert set(checkpoint) == {"model", "iteration"} and checkpoint["iteration"] == 2  # of 0..2


def test_a_round_stopped_after_training_is_not_trained_again_and_loses_nothing(
    trained, tmp_path, monkeypatch
):
    cfg, last = trained
    round_dir = tmp_path / "round0"
    round_dir.mkdir()
    shutil.copy(last.parent / "round0" / "labels.json", round_dir / "labels.json")

    def killed(path):  # the kill point: training has ended, the file is still detectron2's own
        raise Interrupted

    monkeypatch.setattr(train, "keep_weights_only", killed)
    with pytest.raises(Interrupted):
        selftrain.train_round(cfg, 0, round_dir, "", "stopped-after-training")
    weights = round_dir / "model_final.pth"
    full, size = torch.load(weights, weights_only=False), weights.stat().st_size
    assert "trainer" in full
    monkeypatch.undo()

    def no_training(d2cfg):
        raise AssertionError("a round whose training had ended was trained again")

    monkeypatch.setattr(train, "build_trainer", no_training)
    selftrain.train_round(cfg, 0, round_dir, "", "stopped-after-training")
    slim = torch.load(weights, weights_only=True)
    assert set(slim) == {"model", "iteration"} and slim["iteration"] == full["iteration"]
    assert slim["model"].keys() == full["model"].keys()
    assert all(torch.equal(slim["model"][k], full["model"][k]) for k in full["model"])
    assert weights.stat().st_size < 0.75 * size  # SGD momentum: the trainer state is as large as the model
    assert not list(round_dir.glob(".model_final.pth.*"))  # no temporary file left


def test_a_training_round_keeps_only_its_newest_checkpoint_on_disk(trained, tmp_path, monkeypatch):
    from detectron2.engine import HookBase

    cfg, last = trained
    round_dir = tmp_path / "round0"
    round_dir.mkdir()
    shutil.copy(last.parent / "round0" / "labels.json", round_dir / "labels.json")
    on_disk = []

    class ListCheckpoints(HookBase):  # registered after the checkpointer: sees what it left each step
        def after_step(self):
            on_disk.append(sorted(p.name for p in round_dir.glob("model_*.pth")))

    build = train.build_trainer

    def listing_trainer(d2cfg):
        d2cfg.defrost()
        d2cfg.SOLVER.CHECKPOINT_PERIOD = 1
        trainer = build(d2cfg)
        trainer.register_hooks([ListCheckpoints()])
        return trainer

    monkeypatch.setattr(train, "build_trainer", listing_trainer)
    selftrain.train_round(cfg, 0, round_dir, "", "newest-checkpoint")
    assert on_disk == [
        ["model_0000000.pth"],
        ["model_0000001.pth"],
        ["model_0000002.pth", "model_final.pth"],
    ]
    assert [p.name for p in round_dir.glob("model_*.pth")] == ["model_final.pth"]


def test_a_short_round_prints_its_progress_every_few_iterations(trained):
    _, last = trained
    for r in (0, 1):  # 3 iterations: a line after each, not only after the last (detectron2 prints every 20)
        log = (last.parent / f"round{r}" / "log.txt").read_text()
        assert [int(i) for i in re.findall(r"events INFO:\s+(?:eta: \S+\s+)?iter: (\d+)", log)] == [0, 1, 2]
    assert (train.log_period(30), train.log_period(160_000)) == (3, 20)


def test_a_round_is_reproducible_from_the_config_seed(trained, tmp_path):
    # detectron2's own SEED is -1 (a new seed every run) and copy-paste draws from its own generator: both
    # must come from the config's seed, so that a round trained again gives the same weights.
    from pipeline import selftrain
    from pipeline.config import replace

    cfg, last = trained

    def weights(round_dir):
        return torch.load(round_dir / "model_final.pth", weights_only=False)["model"]

    def train_again(seed):
        round_dir = tmp_path / f"seed{seed}"
        round_dir.mkdir()
        shutil.copy(last.parent / "round0" / "labels.json", round_dir / "labels.json")
        selftrain.train_round(replace(cfg, seed=seed), 0, round_dir, "", f"repro-seed{seed}")
        return weights(round_dir)

    first = weights(last.parent / "round0")  # trained by the run, seed 0 (the default)
    again, other = train_again(0), train_again(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)  # the seed is what decides


def test_detectron2s_tracing_check_prints_no_torch_notice(caplog):
    """torch logs a deprecation notice the first time detectron2's ROI pooler asks whether it is traced
    (every load_detector process, every Ray actor); users can do nothing about it, so it is dropped."""
    import logging

    from detectron2.utils.tracing import is_fx_tracing
    from torch.fx import _symbolic_trace

    import stages  # noqa: F401  (installs the filter)

    _symbolic_trace.is_fx_tracing_warning.cache_clear()  # torch prints it once per process
    with caplog.at_level(logging.WARNING):
        assert not is_fx_tracing()
        logging.getLogger("torch.fx._symbolic_trace").warning("another notice")
    assert [r.getMessage() for r in caplog.records] == ["another notice"]


def test_a_rounds_summary_line_says_which_images_ap_scored():
    summary = {
        "round": 0,
        "labels_in": 12,
        "ap": {"bbox": {"AP": 0.047, "AP50": 0.172}, "segm": {"AP": 0.024}},
        "corloc": {"corloc": 0.4},
        "images_scored": 5,
        "images": 11,
    }
    assert selftrain._summary_line(summary) == (
        "round 0: trained on 12 labels; box AP 4.7 AP50 17.2, mask AP 2.4; CorLoc 40.0% "
        "(AP on 5 of the 11 images)"
    )
