"""The detectron2 configs of each round against CutLER's recipe (SPEC "CutLER training"): learning rate over
a self-training round, the values a self-training round does not inherit from round 0, input sizes,
PreciseBN."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from stages.common.export import coco_file, mask_annotation
from stages.detection import train
from stages.detection.copy_paste import CopyPasteLoader

CUTLER_MIN_SIZES = [240, 320, 480, 640, 672, 704, 736, 768, 800, 1024]
MODELS = ["cascade_mask_rcnn_R_50_FPN", "mask_rcnn_R_50_FPN"]


def round_cfg(round_index, preset=None, overrides=(), tmp_path=".", init=None):
    cfg = load_config("demo", "maskcut", list(overrides), preset=preset)
    # CutLER's recipe is the R50 one: train.model=auto would pick ViTDet where DINOv2 weights are found
    model = "cascade_mask_rcnn_R_50_FPN" if cfg.train.model == "auto" else cfg.train.model
    train_cfg = dataclasses.replace(cfg.train, init=init, model=model)
    return train.detectron_cfg(train_cfg, round_index, tmp_path, "", "cpu")


def learning_rates(d2cfg) -> list[float]:
    """The learning rate detectron2's scheduler gives every iteration of the round."""
    from detectron2.solver import build_lr_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=d2cfg.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(d2cfg, optimizer)
    rates = []
    for _ in range(d2cfg.SOLVER.MAX_ITER):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("preset", [None, "cpu-tiny"])
def test_the_self_training_learning_rate_stays_constant_over_a_round(preset):
    d2cfg = round_cfg(1, preset)
    rates = learning_rates(d2cfg)
    assert len(rates) == (80000 if preset is None else 30)
    after_warmup = rates[d2cfg.SOLVER.WARMUP_ITERS :]
    assert after_warmup and all(r == pytest.approx(0.005, rel=1e-9) for r in after_warmup)
    # round 0, for contrast, drops by gamma 0.02 at its step
    round0 = learning_rates(round_cfg(0, preset))
    assert round0[-1] == pytest.approx(0.01 * 0.02)


@pytest.mark.parametrize("model", MODELS)
def test_self_training_rounds_do_not_inherit_round0_rpn_and_solver_overrides(model):
    r0, r1 = (round_cfg(r, overrides=[f"train.model={model}"]) for r in (0, 1))
    assert (r0.MODEL.RPN.POST_NMS_TOPK_TRAIN, r0.MODEL.RPN.NMS_THRESH, r0.SOLVER.WEIGHT_DECAY) == (
        4000,
        0.65,
        5e-5,
    )
    assert (r1.MODEL.RPN.POST_NMS_TOPK_TRAIN, r1.MODEL.RPN.NMS_THRESH, r1.SOLVER.WEIGHT_DECAY) == (
        1000,
        0.7,
        1e-4,
    )
    assert (r0.SOLVER.BASE_LR, r1.SOLVER.BASE_LR, r1.SOLVER.MAX_ITER) == (0.01, 0.005, 80000)
    assert r0.MODEL.ROI_HEADS.DROPLOSS.ENABLED and not r1.MODEL.ROI_HEADS.DROPLOSS.ENABLED
    assert tuple(r0.INPUT.COPY_PASTE.RATIO_RANGE) == (0.3, 1.0)
    assert tuple(r1.INPUT.COPY_PASTE.RATIO_RANGE) == (0.5, 1.0)
    for d2cfg in (r0, r1):
        assert list(d2cfg.INPUT.MIN_SIZE_TRAIN) == CUTLER_MIN_SIZES
        assert d2cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice" and d2cfg.INPUT.MAX_SIZE_TRAIN == 1333
        assert d2cfg.INPUT.COPY_PASTE.MAX_OCCLUSION == 0.5
        assert d2cfg.TEST.PRECISE_BN.ENABLED and d2cfg.TEST.PRECISE_BN.NUM_ITER == 200


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    """Two images with one mask each, registered as a detectron2 training set."""
    root = tmp_path_factory.mktemp("precise_bn")
    images, annotations = [], []
    for i in range(2):
        Image.fromarray(np.full((64, 80, 3), 40 + 60 * i, np.uint8)).save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 80, "height": 64})
        mask = np.zeros((64, 80), bool)
        mask[10:40, 20 + 10 * i : 60] = True
        annotations.append(mask_annotation(mask, i + 1))
    path = root / "labels.json"
    path.write_text(json.dumps(coco_file(images, annotations)))
    train.register_labels("precise_bn_test", path, str(root))
    return root


@pytest.mark.parametrize("init", [None, "dino_resnet50.pth"])
def test_precise_bn_runs_after_training_exactly_when_the_model_has_batchnorm(labels, tmp_path, init):
    from detectron2.engine import hooks

    d2cfg = round_cfg(0, "cpu-tiny", ["train.model=mask_rcnn_R_50_FPN"], tmp_path, init)
    d2cfg.DATASETS.TRAIN = ("precise_bn_test",)
    d2cfg.DATASETS.TEST = ()
    assert d2cfg.MODEL.RESNETS.NORM == ("BN" if init else "GN")
    trainer = train.build_trainer(d2cfg)
    precise = [h for h in trainer._hooks if isinstance(h, hooks.PreciseBN)]
    if init is None:  # GroupNorm: nothing to recompute
        assert precise == []
    else:
        (hook,) = precise
        assert not hook._disabled and hook._num_iter == 10  # the tiny schedule's count (reference: 200)
        # statistics from plain training images, as CutLER's (its copy-paste is in the training step)
        assert not isinstance(hook._data_loader, CopyPasteLoader)
        assert isinstance(trainer.data_loader, CopyPasteLoader)


def test_the_console_gets_a_digest_of_long_listings_and_log_txt_them_whole(tmp_path, capsys):
    import io
    import logging

    from fvcore.common.checkpoint import get_missing_parameters_message

    missing = ["roi_heads.box_head.fc1.weight", "roi_heads.box_head.fc1.bias", "proposal_generator.anchor.x"]
    d2_console = io.StringIO()
    with train.training_log(str(tmp_path)):
        # One console handler from training_log, another if a trainer was built outside it earlier in this
        # process (DefaultTrainer then sets detectron2's logger up itself): read them all.
        handlers = [h for h in logging.getLogger("detectron2").handlers if type(h) is logging.StreamHandler]
        assert handlers
        streams = [h.setStream(d2_console) for h in handlers]
        try:
            logging.getLogger("detectron2.engine.defaults").info("Model:\nGeneralizedRCNN(\n  (backbone)\n)")
            logging.getLogger("detectron2.engine.hooks").info("Overall training speed: 2 iterations")
            logging.getLogger("fvcore.common.checkpoint").warning(get_missing_parameters_message(missing))
        finally:
            for handler, stream in zip(handlers, streams, strict=True):
                handler.setStream(stream)
    console = d2_console.getvalue() + capsys.readouterr().err
    log = (tmp_path / "log.txt").read_text()
    for line in ("GeneralizedRCNN", "Overall training speed", "roi_heads.box_head.fc1", "proposal_generator"):
        assert line in log
    assert "Overall training speed" in console
    assert "GeneralizedRCNN" not in console and "box_head" not in console
    assert "not found in the checkpoint: 2 groups (listed in log.txt; expected when a round starts" in console
