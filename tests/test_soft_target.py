"""CuVLER's soft target loss (stages/detection/soft_target.py): the losses against hand computations and
stock detectron2, the scores' way from a COCO file to the matched proposals of every cascade stage (mapper,
copy-paste), the config option, and training steps of every detector model with the option on."""

import json
import math

import numpy as np
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.selftrain import relabel
from stages.common.export import coco_file, mask_annotation
from stages.detection import soft_target, train
from stages.detection.copy_paste import copy_paste
from stages.detection.detectron_data import ImageMapper
from stages.detection.droploss import DropLossFastRCNNOutputLayers, attach_image_gt_boxes
from stages.detection.soft_target import (
    GT_SCORES,
    ScoredMaskRCNNConvUpsampleHead,
    annotation_scores,
    scored_mask_loss,
    soft_cross_entropy,
)
from tests.test_vitdet import SMALL_INPUT, TINY_OPTS

FG, BG = 0, 1  # class-agnostic: class 0 is "object", 1 background


# ----------------------------------------------------------------------------------------------------------
# The losses


def _predictor(droploss: bool, soft: bool, seed: int = 0):
    torch.manual_seed(seed)
    predictor = DropLossFastRCNNOutputLayers(
        input_shape=ShapeSpec(channels=8),
        box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0)),
        num_classes=1,
        cls_agnostic_bbox_reg=True,
        droploss_enabled=droploss,
        droploss_iou_thresh=0.01,
        soft_target=soft,
    )
    torch.nn.init.normal_(predictor.cls_score.weight, std=1.0)
    return predictor


def _stock(predictor):
    stock = FastRCNNOutputLayers(
        input_shape=ShapeSpec(channels=8),
        box2box_transform=predictor.box2box_transform,
        num_classes=1,
        cls_agnostic_bbox_reg=True,
    )
    stock.load_state_dict(predictor.state_dict())
    return stock


GT = torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 52.0, 50.0]])


def _image(classes, matched, boxes, scores):
    """One image's sampled proposals: gt_classes, matched pseudo-box index, proposal boxes, label scores."""
    image = Instances((64, 64))
    image.proposal_boxes = Boxes(torch.tensor(boxes))
    image.gt_classes = torch.tensor(classes)
    image.gt_boxes = Boxes(GT[matched])
    image.set(GT_SCORES, torch.tensor(scores)[matched])
    (image,) = attach_image_gt_boxes([image], [Instances((64, 64), gt_boxes=Boxes(GT))])
    return image


def _proposals(scores=(1.0, 1.0)):
    """Five proposals: two on pseudo-box 0, one on pseudo-box 1, two background (one of them far from every
    pseudo-box, which DropLoss drops)."""
    boxes = [[1.0, 1.0, 9.0, 9.0], [0.0, 0.0, 11.0, 10.0], [41.0, 40.0, 52.0, 51.0], [5.0, 5.0, 30.0, 30.0]]
    boxes.append([20.0, 20.0, 30.0, 30.0])
    return [_image([FG, FG, FG, BG, BG], [0, 0, 1, 0, 0], boxes, list(scores))]


def _predictions(predictor, n=5):
    torch.manual_seed(1)
    scores, deltas = predictor(torch.randn(n, 8))
    return scores, deltas + torch.randn_like(deltas) * 0.1  # a nonzero box loss


def test_soft_cross_entropy_with_score_1_is_the_cross_entropy():
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([FG, BG, FG, BG, FG, FG])
    plain = torch.nn.functional.cross_entropy(logits, classes, reduction="none")
    assert torch.allclose(soft_cross_entropy(logits, classes, torch.ones(6)), plain, atol=1e-6)
    # Background proposals keep the hard background target whatever the score they carry.
    soft = soft_cross_entropy(logits, classes, torch.full((6,), 0.3))
    assert torch.allclose(soft[classes == BG], plain[classes == BG], atol=1e-6)
    assert not torch.allclose(soft[classes == FG], plain[classes == FG])


@pytest.mark.parametrize("droploss", [False, True], ids=["plain", "droploss"])
def test_with_every_score_1_the_losses_are_the_plain_or_droploss_ones(droploss):
    soft = _predictor(droploss, soft=True)
    hard = _predictor(droploss, soft=False) if droploss else _stock(soft)
    hard.load_state_dict(soft.state_dict())
    predictions = _predictions(soft)
    with EventStorage():
        got, want = soft.losses(predictions, _proposals()), hard.losses(predictions, _proposals())
    assert got.keys() == want.keys()
    assert want["loss_box_reg"] > 0 and want["loss_cls"] > 0
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-6, atol=0), k


def test_a_proposal_matched_to_a_low_score_label_has_a_soft_target_and_a_weighted_box_loss():
    # Pseudo-box 1 has score 0.25: proposal 2 (matched to it) gets the target (object 0.25, background 0.75)
    # and a quarter of its box loss; the other proposals are as without the option.
    soft = _predictor(droploss=False, soft=True)
    stock = _stock(soft)
    proposals = _proposals(scores=(1.0, 0.25))
    logits, deltas = _predictions(soft)
    with EventStorage():
        got = soft.losses((logits, deltas), proposals)
        full = stock.losses((logits, deltas), proposals)
        only_0_1 = proposals[0][torch.tensor([0, 1])]
        without_2 = stock.losses((logits[[0, 1]], deltas[[0, 1]]), [only_0_1])
    log_p = torch.log_softmax(logits.detach().double(), dim=1)
    classes = [FG, FG, FG, BG, BG]
    terms = [-log_p[i, c].item() for i, c in enumerate(classes)]
    terms[2] = -(0.25 * log_p[2, FG].item() + 0.75 * log_p[2, BG].item())
    assert math.isclose(got["loss_cls"].item(), sum(terms) / 5, rel_tol=1e-5)
    # Box loss per proposal: stock losses are normalised by the proposal count (5, then 2).
    box_2 = 5 * full["loss_box_reg"].item() - 2 * without_2["loss_box_reg"].item()
    assert box_2 > 0
    expected_box = (2 * without_2["loss_box_reg"].item() + 0.25 * box_2) / 5
    assert math.isclose(got["loss_box_reg"].item(), expected_box, rel_tol=1e-5)


def test_the_soft_target_is_met_when_the_object_probability_equals_the_score():
    # The classification loss of a proposal matched to a label of score s has its minimum at p(object) = s:
    # zero gradient there, while the hard target still pushes towards 1.
    s = 0.25
    logits = torch.tensor([[math.log(s), math.log(1 - s)]], requires_grad=True)
    soft_cross_entropy(logits, torch.tensor([FG]), torch.tensor([s])).sum().backward()
    assert torch.allclose(logits.grad, torch.zeros(1, 2), atol=1e-7)
    hard = torch.tensor([[math.log(s), math.log(1 - s)]], requires_grad=True)
    soft_cross_entropy(hard, torch.tensor([FG]), torch.tensor([1.0])).sum().backward()
    assert hard.grad[0, FG] < 0  # gradient descent raises the object logit


def test_droploss_and_the_soft_target_combine_as_weight_times_soft_cross_entropy():
    soft = _predictor(droploss=True, soft=True)
    with torch.no_grad():
        soft.bbox_pred.weight.zero_()  # regressed boxes = proposal boxes: the DropLoss weights are known
        soft.bbox_pred.bias.zero_()
    proposals = _proposals(scores=(0.5, 0.8))
    logits, deltas = soft(torch.randn(5, 8, generator=torch.Generator().manual_seed(3)))
    with EventStorage():
        got = soft.losses((logits, deltas), proposals)["loss_cls"]
    weights = [1.0, 1.0, 1.0, 1.0, 0.0]  # the last proposal overlaps no pseudo-box
    scores = [0.5, 0.5, 0.8]
    log_p = torch.log_softmax(logits.detach().double(), dim=1)
    terms = [-(s * log_p[i, FG] + (1 - s) * log_p[i, BG]).item() for i, s in enumerate(scores)]
    terms += [-log_p[3, BG].item(), -log_p[4, BG].item()]
    expected = sum(w * t for w, t in zip(weights, terms, strict=True)) / 5
    assert math.isclose(got.item(), expected, rel_tol=1e-5)


def _mask_instances(scores):
    inst = Instances((32, 32))
    masks = torch.zeros(len(scores), 32, 32, dtype=torch.bool)
    masks[0, 4:20, 4:12] = True
    masks[1, 10:30, 8:28] = True
    inst.gt_masks = BitMasks(masks)
    inst.proposal_boxes = Boxes(torch.tensor([[2.0, 2.0, 16.0, 22.0], [8.0, 8.0, 30.0, 30.0]]))
    inst.gt_classes = torch.zeros(2, dtype=torch.long)
    inst.set(GT_SCORES, torch.tensor(scores))
    return inst


def test_the_mask_loss_is_stock_with_scores_1_and_weighted_by_the_score_otherwise():
    logits = torch.randn(2, 1, 14, 14, generator=torch.Generator().manual_seed(0))
    with EventStorage():
        stock = mask_rcnn_loss(logits, [_mask_instances([1.0, 1.0])])
        one = [torch.tensor([i]) for i in range(2)]
        each = [mask_rcnn_loss(logits[i], [_mask_instances([1.0, 1.0])[i]]).item() for i in one]
    assert torch.allclose(scored_mask_loss(logits, [_mask_instances([1.0, 1.0])]), stock, rtol=1e-6)
    got = scored_mask_loss(logits, [_mask_instances([1.0, 0.4])]).item()
    assert math.isclose(got, (each[0] + 0.4 * each[1]) / 2, rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Scores from the label file to the matched proposals


def test_annotation_scores_default_to_1_and_must_lie_in_0_1():
    assert annotation_scores([{"score": 0.3}, {}, {"score": 1}]).tolist() == pytest.approx([0.3, 1.0, 1.0])
    assert annotation_scores([]).shape == (0,)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="score"):
            annotation_scores([{"score": bad}])
    assert annotation_scores([{"score": 1.5}], check=False).tolist() == [1.5]  # option off: carried as is


def test_the_mapper_checks_scores_only_with_the_option_on(tmp_path):
    from detectron2.data import DatasetCatalog

    labels = _write_labels(tmp_path)
    data = json.loads(labels.read_text())
    data["annotations"][0]["score"] = 1.5
    labels.write_text(json.dumps(data))
    train.register_labels("soft-target-bad-score", labels, str(tmp_path))
    first = DatasetCatalog.get("soft-target-bad-score")[0]
    off = ImageMapper(_d2_cfg(soft=False, opts=R50_SMALL), is_train=True)
    assert off(first)["instances"].get(GT_SCORES).tolist() == pytest.approx([1.5, 1.0])
    with pytest.raises(ValueError, match="must be in"):
        ImageMapper(_d2_cfg(soft=True, opts=R50_SMALL), is_train=True)(first)


def test_the_mapper_hands_detectron2_masks_it_may_write(tmp_path, monkeypatch):
    """detectron2's resize returns masks as read-only views of a PIL image; torch warns on turning those
    into tensors. The mapper copies them first."""
    from detectron2.data import DatasetCatalog, detection_utils

    train.register_labels("writable-masks", _write_labels(tmp_path), str(tmp_path))
    seen = []
    to_instances = detection_utils.annotations_to_instances

    def spy(annos, *args, **kwargs):
        seen.extend(anno["segmentation"] for anno in annos)
        return to_instances(annos, *args, **kwargs)

    monkeypatch.setattr(detection_utils, "annotations_to_instances", spy)
    # 96x128 images resized to a 48-pixel short side: detectron2's ResizeTransform runs on every mask.
    small = ["INPUT.MIN_SIZE_TRAIN", [48], "INPUT.MAX_SIZE_TRAIN", 64]
    mapper = ImageMapper(_d2_cfg(opts=small), is_train=True)
    for record in DatasetCatalog.get("writable-masks"):
        assert tuple(mapper(record)["image"].shape[1:]) == (48, 64)
    assert len(seen) == 5
    assert all(isinstance(m, np.ndarray) and m.shape == (48, 64) and m.flags.writeable for m in seen)


def _rect(h, w, y0, y1, x0, x1):
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _write_labels(root):
    """Two 96x128 images: image 1 with a scored, an empty (dropped by the mapper) and an unscored object,
    image 2 with two scored objects."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    empty = np.zeros((96, 128), bool)
    objects = {
        1: [(_rect(96, 128, 10, 50, 10, 60), 0.9), (empty, 0.5), (_rect(96, 128, 60, 90, 70, 120), None)],
        2: [(_rect(96, 128, 20, 40, 5, 100), 0.3), (_rect(96, 128, 45, 95, 60, 75), 0.6)],
    }
    for image_id, objs in objects.items():
        name = f"img{image_id}.png"
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(root / name)
        images.append({"id": image_id, "file_name": name, "width": 128, "height": 96})
        annotations += [mask_annotation(m, image_id, score) for m, score in objs]
    path = root / "labels.json"
    path.write_text(json.dumps(coco_file(images, annotations)))
    return path


def _d2_cfg(model="cascade_mask_rcnn_R_50_FPN", soft=True, opts=()):
    overrides = [
        f"train.model={model}",
        "train.schedule=[tiny_cpu]",
        f"train.soft_target={str(soft).lower()}",
        f"train.opts={list(opts)}",
    ]
    return train.detectron_cfg(load_config("demo", "maskcut", overrides).train, 0, ".", "", "cpu")


R50_SMALL = [
    "INPUT.MIN_SIZE_TRAIN", [96], "INPUT.MAX_SIZE_TRAIN", 128,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
]  # fmt: skip


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """The two images mapped for training (96x128, flips off) from a registered label file."""
    from detectron2.data import DatasetCatalog

    root = tmp_path_factory.mktemp("scored")
    labels = _write_labels(root)
    train.register_labels("soft-target-test", labels, str(root))
    cfg = _d2_cfg(opts=[*R50_SMALL, "INPUT.RANDOM_FLIP", "none"])
    mapper = ImageMapper(cfg, is_train=True)
    return [mapper(d) for d in DatasetCatalog.get("soft-target-test")]


def test_scores_reach_the_instances_through_the_mapper(mapped):
    first, second = (d["instances"] for d in mapped)
    assert first.get(GT_SCORES).tolist() == pytest.approx([0.9, 1.0])  # the empty mask dropped, no score: 1
    assert second.get(GT_SCORES).tolist() == pytest.approx([0.3, 0.6])
    assert first.get(GT_SCORES).dtype == torch.float32


def test_pasted_objects_keep_their_own_scores():
    # Target: one object of score 0.4. Source: a wide object (0.7) and a tall one (0.8); exactly one is
    # pasted (1 of n - 1), and its shape tells which.
    def item(rects, scores):
        inst = Instances((64, 64))
        inst.gt_masks = BitMasks(torch.from_numpy(np.stack([_rect(64, 64, *r) for r in rects])))
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = torch.zeros(len(rects), dtype=torch.long)
        inst.set(GT_SCORES, torch.tensor(scores))
        return {"image": torch.zeros(3, 64, 64, dtype=torch.uint8), "instances": inst}

    target, source = item([(0, 8, 0, 8)], [0.4]), item([(10, 18, 0, 60), (0, 60, 40, 48)], [0.7, 0.8])
    pasted_scores = set()
    for seed in range(20):
        out = copy_paste([target, source], (0.8, 1.0), 0.5, np.random.default_rng(seed))[0]["instances"]
        if len(out) == 1:
            continue  # nothing pasted (occlusion rule)
        assert len(out) == 2 and out.get(GT_SCORES)[0].item() == pytest.approx(0.4)
        x0, y0, x1, y1 = out.gt_boxes.tensor[1].tolist()
        expected = 0.7 if x1 - x0 > y1 - y0 else 0.8
        assert out.get(GT_SCORES)[1].item() == pytest.approx(expected)
        pasted_scores.add(expected)
    assert pasted_scores == {0.7, 0.8}  # both kinds were pasted over the seeds


@pytest.mark.parametrize("model", ["cascade_mask_rcnn_R_50_FPN", "mask_rcnn_R_50_FPN"])
def test_every_stage_and_the_mask_head_see_the_matched_labels_scores(model, mapped, monkeypatch):
    seen = {"box": [], "mask": []}
    box_losses, mask_loss = DropLossFastRCNNOutputLayers.losses, soft_target.scored_mask_loss
    monkeypatch.setattr(
        DropLossFastRCNNOutputLayers,
        "losses",
        lambda self, pred, props: seen["box"].append(props) or box_losses(self, pred, props),
    )
    monkeypatch.setattr(
        soft_target, "scored_mask_loss", lambda x, inst: seen["mask"].append(inst) or mask_loss(x, inst)
    )
    torch.manual_seed(0)
    net = build_model(_d2_cfg(model, opts=R50_SMALL))
    net.train()
    batch = copy_paste(mapped, (0.5, 1.0), 0.5, np.random.default_rng(0))  # pasted objects: their own scores
    with EventStorage():
        net(batch)
    assert len(seen["box"]) == (3 if model.startswith("cascade") else 1) and len(seen["mask"]) == 1
    checked = 0
    for proposals in [*seen["box"], seen["mask"][0]]:
        for props, d in zip(proposals, batch, strict=True):
            target = d["instances"]
            fg = props.gt_classes == FG
            # The score of each foreground proposal is that of the label whose box it was matched to.
            same = (props.gt_boxes.tensor[fg, None, :] == target.gt_boxes.tensor[None]).all(dim=2)
            assert (same.sum(dim=1) == 1).all()
            assert torch.equal(props.get(GT_SCORES)[fg], target.get(GT_SCORES)[same.int().argmax(dim=1)])
            checked += int(fg.sum())
    assert checked > 0


# ----------------------------------------------------------------------------------------------------------
# The option: config, validation, training


def test_the_option_is_off_by_default_and_reaches_detectron2():
    assert load_config("demo", "maskcut").train.soft_target is False
    assert _d2_cfg(soft=False).MODEL.ROI_HEADS.SOFT_TARGET is False
    for r in (0, 1):  # every round, the self-training overlay included
        cfg = load_config(
            "demo", "maskcut", ["train.soft_target=true", "train.model=mask_rcnn_R_50_FPN"]
        ).train
        assert train.detectron_cfg(cfg, r, ".", "", "cpu").MODEL.ROI_HEADS.SOFT_TARGET is True
    with pytest.raises(ConfigError, match="train.soft_target"):
        load_config("demo", "maskcut", ["train.soft_target=maybe"])


def test_the_option_is_refused_where_it_would_do_nothing(tmp_path):
    with pytest.raises(ValueError, match="SOFT_TARGET needs the ROI heads"):
        _d2_cfg(opts=["MODEL.ROI_HEADS.NAME", "CascadeROIHeads"])
    with pytest.raises(ValueError, match="ROI_MASK_HEAD.NAME"):
        build_model(_d2_cfg(opts=["MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead_x"]))
    sigmoid = ["MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", True, "MODEL.ROI_HEADS.DROPLOSS.ENABLED", False]
    with pytest.raises(ValueError, match="soft target loss needs softmax"):
        build_model(_d2_cfg(opts=sigmoid))
    labels = tmp_path / "labels.json"
    ann = mask_annotation(_rect(8, 8, 0, 4, 0, 4), 1, 1.5)
    image = {"id": 1, "file_name": "a.png", "width": 8, "height": 8}
    labels.write_text(json.dumps(coco_file([image], [ann])))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    train.check_labels(labels, str(tmp_path), {"a.png"})  # fine without the soft target
    with pytest.raises(train.TrainingError, match="annotation 1 has score 1.5"):
        train.check_labels(labels, str(tmp_path), {"a.png"}, scores=True)


# Both heads and both backbones (the other two pairs build from the same pieces; the test above runs both
# R50 heads' forward pass with the option on).
MODELS = {"cascade_mask_rcnn_R_50_FPN": R50_SMALL, "mask_rcnn_vitdet_s14": [*TINY_OPTS, *SMALL_INPUT]}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_two_training_steps_with_the_soft_target(model, mapped):
    cfg = _d2_cfg(model, opts=MODELS[model])
    assert cfg.MODEL.ROI_HEADS.DROPLOSS.ENABLED  # round 0: with DropLoss
    torch.manual_seed(0)
    net = build_model(cfg)
    net.train()
    predictors = net.roi_heads.box_predictor
    predictors = list(predictors) if isinstance(predictors, torch.nn.ModuleList) else [predictors]
    assert len(predictors) == (3 if model.startswith("cascade") else 1)
    assert all(p.soft_target and p.droploss_enabled for p in predictors)
    assert type(net.roi_heads.mask_head) is ScoredMaskRCNNConvUpsampleHead
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    batch = copy_paste(mapped, (0.5, 1.0), 0.5, np.random.default_rng(0))
    totals = []
    with EventStorage():
        for _ in range(2):
            losses = net(batch)
            total = sum(losses.values())
            assert all(math.isfinite(v.item()) for v in losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            totals.append(total.item())
    assert totals[0] != totals[1]  # the step changed the model


def test_relabelled_predictions_carry_the_detectors_score_and_old_labels_their_own():
    # CuVLER's self-training labels are the detector's predictions with the detector's score (its soft
    # target); ours merge them with the previous labels (CutLER), which keep their own scores.
    wide, tall = _rect(32, 32, 2, 8, 0, 30), _rect(32, 32, 0, 30, 24, 30)
    previous = coco_file(
        [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        [mask_annotation(wide, 1, 0.35), mask_annotation(tall, 1)],
    )
    predictions = coco_file(
        previous["images"],
        [mask_annotation(wide, 1, 0.9), mask_annotation(_rect(32, 32, 12, 20, 4, 12), 1, 0.2)],
    )
    labels, _ = relabel(previous, predictions, thresh=0.5, merge_iou=0.5)
    assert [a.get("score") for a in labels["annotations"]] == [0.9, None]  # the kept prediction, then `tall`
    assert annotation_scores(labels["annotations"]).tolist() == pytest.approx([0.9, 1.0])
