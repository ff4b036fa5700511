"""DropLoss: the weight rule, the predictor's losses against stock detectron2, the registered ROI heads."""

import math

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from stages.detection.detectron_config import add_cutler_config
from stages.detection.droploss import (
    IMAGE_GT_BOXES,
    DropLossFastRCNNOutputLayers,
    attach_image_gt_boxes,
    droploss_weights,
)

THRESH = 0.01
GT = torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 51.0, 49.0]])  # areas 100 and 99

# Regressed boxes and whether each keeps its classification loss.
CASES = [
    ([9.0, 9.0, 10.0, 10.0], 0.0),  # IoU exactly 1/100 = the threshold with GT[0]: dropped
    ([50.0, 48.0, 51.0, 49.0], 1.0),  # IoU 1/99 with GT[1], just above the threshold: kept
    ([20.0, 20.0, 30.0, 30.0], 0.0),  # overlaps nothing: dropped
    ([1.0, 1.0, 9.0, 9.0], 1.0),  # well inside GT[0]: kept
    ([45.0, 45.0, 60.0, 60.0], 1.0),  # overlaps only the second box (not GT[0]): kept
]


def test_weights_drop_exactly_the_proposals_at_or_below_the_threshold():
    boxes = torch.tensor([c[0] for c in CASES])
    expected = torch.tensor([c[1] for c in CASES])
    assert torch.equal(droploss_weights(boxes, GT, THRESH), expected)


def test_weights_of_an_image_without_pseudo_boxes_are_zero():
    boxes = torch.tensor([c[0] for c in CASES])
    assert torch.equal(droploss_weights(boxes, torch.zeros((0, 4)), THRESH), torch.zeros(len(CASES)))


def _predictors(enabled: bool):
    """A DropLoss predictor and a stock predictor with identical parameters."""
    common = dict(
        input_shape=ShapeSpec(channels=8),
        box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0)),
        num_classes=1,
        cls_agnostic_bbox_reg=True,
    )
    ours = DropLossFastRCNNOutputLayers(**common, droploss_enabled=enabled, droploss_iou_thresh=THRESH)
    stock = FastRCNNOutputLayers(**common)
    torch.nn.init.normal_(ours.cls_score.weight, std=1.0)
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def _proposals():
    """Two images: the CASES proposals against GT, and two proposals on an image with one pseudo-box."""
    image0 = Instances((64, 64))
    image0.proposal_boxes = Boxes(torch.tensor([c[0] for c in CASES]))
    image0.gt_classes = torch.tensor([1, 0, 1, 0, 0])  # 0 = foreground, 1 = background
    # The last proposal is "matched" to GT[0] but its box overlaps only GT[1]: the weight must use all boxes.
    image0.gt_boxes = Boxes(GT[[0, 1, 0, 0, 0]])
    image1 = Instances((64, 64))
    image1.proposal_boxes = Boxes(torch.tensor([[2.0, 2.0, 12.0, 12.0], [30.0, 30.0, 40.0, 40.0]]))
    image1.gt_classes = torch.tensor([0, 1])
    image1.gt_boxes = Boxes(torch.tensor([[2.0, 2.0, 12.0, 12.0]] * 2))
    targets = [
        Instances((64, 64), gt_boxes=Boxes(GT)),
        Instances((64, 64), gt_boxes=Boxes(image1.gt_boxes.tensor[:1])),
    ]
    return attach_image_gt_boxes([image0, image1], targets)


def _predictions(predictor, n):
    torch.manual_seed(1)
    features = torch.randn(n, 8)
    scores, deltas = predictor(features)
    deltas = deltas + torch.randn_like(deltas) * 0.1  # a nonzero box loss, same for both predictors
    return scores, deltas


def test_classification_loss_is_the_weighted_mean_over_all_proposals():
    ours, _ = _predictors(enabled=True)
    proposals = _proposals()
    with torch.no_grad():
        ours.bbox_pred.weight.zero_()
    scores, deltas = ours(torch.randn(7, 8))
    assert torch.count_nonzero(deltas) == 0  # regressed boxes are the proposal boxes themselves
    with EventStorage():
        loss = ours.losses((scores, deltas), proposals)["loss_cls"]
    weights = [c[1] for c in CASES] + [1.0, 0.0]  # image 1: on its box, then disjoint from it
    classes = torch.cat([p.gt_classes for p in proposals])
    log_probs = torch.log_softmax(scores.detach().double(), dim=1)
    expected = sum(-w * log_probs[i, classes[i]].item() for i, w in enumerate(weights)) / 7
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    assert 0 < loss.item() < torch.nn.functional.cross_entropy(scores, classes).item()


def test_weights_come_from_the_regressed_boxes_not_the_proposals():
    # Each proposal is regressed (by the deltas given) to a box whose DropLoss verdict is the opposite of
    # its own: only weights taken from the regressed boxes give the expected loss.
    ours, _ = _predictors(enabled=True)
    proposal_boxes = torch.tensor(
        [
            [20.0, 20.0, 30.0, 30.0],  # overlaps nothing, regressed onto GT[0]: kept
            [0.0, 0.0, 10.0, 10.0],  # on GT[0], regressed away from every pseudo-box: dropped
            [41.0, 41.0, 50.0, 48.0],  # inside GT[1], regressed to a corner far from both: dropped
        ]
    )
    regressed = torch.tensor([[1.0, 1.0, 9.0, 9.0], [20.0, 20.0, 30.0, 30.0], [52.0, 2.0, 62.0, 12.0]])
    weights = [1.0, 0.0, 0.0]
    image = Instances((64, 64))
    image.proposal_boxes = Boxes(proposal_boxes)
    image.gt_classes = torch.tensor([0, 1, 0])
    image.gt_boxes = Boxes(GT[[0, 0, 1]])
    (image,) = attach_image_gt_boxes([image], [Instances((64, 64), gt_boxes=Boxes(GT))])
    deltas = ours.box2box_transform.get_deltas(proposal_boxes, regressed)  # detectron2's own encoding
    assert torch.allclose(ours.box2box_transform.apply_deltas(deltas, proposal_boxes), regressed, atol=1e-4)
    scores = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    with EventStorage():
        loss = ours.losses((scores, deltas), [image])["loss_cls"]
    log_probs = torch.log_softmax(scores.double(), dim=1)
    expected = sum(-w * log_probs[i, image.gt_classes[i]].item() for i, w in enumerate(weights)) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_disabled_losses_are_bit_identical_to_stock():
    ours, stock = _predictors(enabled=False)
    proposals = _proposals()
    predictions = _predictions(ours, 7)
    with EventStorage():
        got, want = ours.losses(predictions, proposals), stock.losses(predictions, proposals)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_enabled_changes_only_the_classification_loss():
    ours, stock = _predictors(enabled=True)
    proposals = _proposals()
    predictions = _predictions(ours, 7)
    with EventStorage():
        got, want = ours.losses(predictions, proposals), stock.losses(predictions, proposals)
    assert want["loss_box_reg"] > 0
    assert torch.equal(got["loss_box_reg"], want["loss_box_reg"])
    assert not torch.equal(got["loss_cls"], want["loss_cls"])


def test_without_the_gt_set_field_the_predictor_refuses():
    ours, _ = _predictors(enabled=True)
    proposals = _proposals()
    for p in proposals:
        p.remove(IMAGE_GT_BOXES)
    with EventStorage(), pytest.raises(KeyError, match=IMAGE_GT_BOXES):
        ours.losses(_predictions(ours, 7), proposals)


# ---------------------------------------------------------------------------------------------------------
# Whole models: the registered heads, on CPU with random init (GN, see INSTALL-NOTES)

MODELS = {
    "cascade": ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", "DropLossCascadeROIHeads", "CascadeROIHeads"),
    "mask_rcnn": (
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
        "DropLossROIHeads",
        "StandardROIHeads",
    ),
}


def _cfg(kind: str, heads: str, droploss: bool):
    cfg = get_cfg()
    add_cutler_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(MODELS[kind][0]))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.NORM = cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.ROI_HEADS.NAME = heads
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    cfg.MODEL.ROI_HEADS.DROPLOSS.ENABLED = droploss
    # Small heads and few proposals: the test is about wiring, not capacity.
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN, cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200, 100
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    return cfg


def _batch():
    gen = torch.Generator().manual_seed(0)
    batch = []
    for rects in ([(5, 30, 10, 40), (30, 60, 50, 90)], [(10, 50, 20, 70)]):
        inst = Instances((64, 96))
        masks = torch.zeros(len(rects), 64, 96, dtype=torch.bool)
        for i, (y0, y1, x0, x1) in enumerate(rects):
            masks[i, y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = torch.zeros(len(rects), dtype=torch.long)
        batch.append(
            {"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=gen), "instances": inst}
        )
    return batch


def _train_losses(cfg, batch):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    torch.manual_seed(1)  # the proposal sampling
    with EventStorage() as storage:
        losses = model(batch)
    return model, losses, storage


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_droploss_heads_train_with_droploss_at_every_stage(kind, monkeypatch):
    seen = []  # (stage proposals' gt sets) per call of the DropLoss weights
    original = DropLossFastRCNNOutputLayers.proposal_weights

    def spy(self, predictions, proposals):
        seen.append([p.get(IMAGE_GT_BOXES)[0] for p in proposals])
        return original(self, predictions, proposals)

    monkeypatch.setattr(DropLossFastRCNNOutputLayers, "proposal_weights", spy)
    batch = _batch()
    model, losses, storage = _train_losses(_cfg(kind, MODELS[kind][1], droploss=True), batch)

    predictors = model.roi_heads.box_predictor
    predictors = list(predictors) if isinstance(predictors, torch.nn.ModuleList) else [predictors]
    assert len(predictors) == (3 if kind == "cascade" else 1)
    assert all(type(p) is DropLossFastRCNNOutputLayers and p.droploss_enabled for p in predictors)
    assert len(seen) == len(predictors)  # the weights were computed at every stage ...
    for gt_sets in seen:  # ... against all pseudo-boxes of each image
        assert all(
            torch.equal(g, d["instances"].gt_boxes.tensor) for g, d in zip(gt_sets, batch, strict=True)
        )
    kept = [k for k in storage.latest() if k.endswith("droploss_kept_fraction")]
    assert len(kept) == len(predictors)
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert sum(losses.values()).requires_grad


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_disabled_heads_train_exactly_like_stock_heads(kind):
    batch = _batch()
    _, ours, _ = _train_losses(_cfg(kind, MODELS[kind][1], droploss=False), batch)
    _, stock, _ = _train_losses(_cfg(kind, MODELS[kind][2], droploss=False), batch)
    assert ours.keys() == stock.keys()
    assert all(torch.equal(ours[k], stock[k]) for k in stock)
