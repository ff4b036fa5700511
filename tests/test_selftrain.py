"""Self-training end to end on generated data with a tiny schedule; resume; detector loading; bad inputs."""

import json

import numpy as np
import pytest
import torch
import torchvision

from pipeline import load_detector
from pipeline.config import load_config
from pipeline.selftrain import run
from stages import train
from stages.export import coco_file, mask_annotation
from tests.synthetic import object_image, write_image_folder

pytestmark = pytest.mark.usefixtures("ray_local")

TINY = [
    "run.workers=2",
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


def test_rounds_are_evaluated_only_where_there_is_ground_truth(images, trained, monkeypatch):
    import dataclasses

    from pipeline import selftrain
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
