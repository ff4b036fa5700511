"""DropLoss (SPEC "CutLER training") as detectron2 extensions.

Pseudo-masks miss many objects, so a proposal that overlaps no pseudo-box may well be an object: calling it
background would teach the detector to ignore exactly what it should discover. DropLoss therefore removes
such proposals from the classification loss: a proposal whose *regressed* box has max IoU <= threshold with
every pseudo-box of its image gets weight 0 there (the box loss is unchanged; it only concerns foreground).

Pieces:
- :func:`droploss_weights`: the rule, as a pure function of boxes.
- :class:`DropLossFastRCNNOutputLayers`: a ``FastRCNNOutputLayers`` whose ``losses`` reweights the
  classification term; everything else is stock.
- ``DropLossROIHeads`` (Mask R-CNN) and ``DropLossCascadeROIHeads`` (Cascade Mask R-CNN), registered in
  ``ROI_HEADS_REGISTRY``: they install the predictor (every cascade stage) when
  ``MODEL.ROI_HEADS.DROPLOSS.ENABLED`` and give each sampled proposal a view of *all* pseudo-boxes of its
  image (field :data:`IMAGE_GT_BOXES`), because the stock labelling keeps only the matched box.

Difference from CutLER's code, kept on purpose: its cascade heads compare each proposal with only the first
u of the proposals' *matched* boxes, u = the number of distinct boxes among the first 100 proposals'
matches (a side effect of how it indexes them), so some pseudo-boxes can be missing from the comparison and
others repeated. Here every proposal is compared with all pseudo-boxes of its image, the paper's definition
and SPEC's; a proposal can then only be kept where CutLER's code would drop it, never the reverse.

Use: ``import stages.detection.droploss`` (registers the heads), ``add_cutler_config(cfg)``, then
``cfg.MODEL.ROI_HEADS.NAME = "DropLossCascadeROIHeads"`` (or ``"DropLossROIHeads"``).
With DropLoss disabled these heads build and train exactly like the stock ones.
"""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    FastRCNNOutputLayers,
    StandardROIHeads,
)
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage
from torch.nn import functional as F

# Per-proposal field holding all pseudo-boxes of the proposal's image: an (R, G, 4) tensor, an expanded (not
# copied) view of the image's (G, 4) gt boxes. Instances only stores per-row fields, hence the repetition.
IMAGE_GT_BOXES = "image_gt_boxes"


def droploss_weights(
    regressed_boxes: torch.Tensor, gt_boxes: torch.Tensor, iou_thresh: float
) -> torch.Tensor:
    """Classification-loss weight of each proposal of one image.

    Args:
        regressed_boxes: (N, 4) float, XYXY, the proposals' regressed boxes.
        gt_boxes: (G, 4) float, XYXY, all pseudo-boxes of the image.
        iou_thresh: a proposal whose max IoU with the pseudo-boxes is <= this gets weight 0.

    Returns:
        (N,) float tensor of 0.0 / 1.0, on the device of ``regressed_boxes``.
        An image with no pseudo-box gives all zeros: the max over an empty set is taken as IoU 0, and an
        image without pseudo-labels is no evidence that it shows only background.
    """
    if gt_boxes.shape[0] == 0:
        return regressed_boxes.new_zeros(regressed_boxes.shape[0])
    iou = pairwise_iou(Boxes(regressed_boxes), Boxes(gt_boxes.to(regressed_boxes)))
    return (iou.max(dim=1).values > iou_thresh).to(regressed_boxes.dtype)


def attach_image_gt_boxes(proposals: list[Instances], targets: list[Instances]) -> list[Instances]:
    """Set :data:`IMAGE_GT_BOXES` on each image's proposals (in place) from that image's targets."""
    for props, target in zip(proposals, targets, strict=True):
        gt = target.gt_boxes.tensor
        props.set(IMAGE_GT_BOXES, gt.unsqueeze(0).expand(len(props), *gt.shape))
    return proposals


class DropLossFastRCNNOutputLayers(FastRCNNOutputLayers):
    """``FastRCNNOutputLayers`` with DropLoss on the classification loss.

    With DropLoss enabled: ``loss_cls = sum_i w_i * CE_i / N`` over all N sampled proposals of the batch
    (dropped ones count in N), ``w_i`` from :func:`droploss_weights` on the proposal's regressed box
    (``predict_boxes``, detached, not clipped) and all pseudo-boxes of its image. ``loss_box_reg`` and the
    logged statistics are stock. Disabled: ``losses`` is exactly ``FastRCNNOutputLayers.losses``.

    Needs the proposals' :data:`IMAGE_GT_BOXES` field (set by the DropLoss ROI heads), one regressed box per
    proposal (class-agnostic regression or one class) and softmax cross-entropy.
    """

    @configurable
    def __init__(self, input_shape, *, droploss_enabled: bool, droploss_iou_thresh: float, **kwargs):
        """Same arguments as ``FastRCNNOutputLayers``, plus the two ``MODEL.ROI_HEADS.DROPLOSS`` values."""
        super().__init__(input_shape, **kwargs)
        self.droploss_enabled = droploss_enabled
        self.droploss_iou_thresh = droploss_iou_thresh
        if droploss_enabled and self.use_sigmoid_ce:
            raise ValueError("DropLoss is implemented for softmax cross-entropy only (USE_SIGMOID_CE=False)")
        if droploss_enabled and self.bbox_pred.out_features != len(self.box2box_transform.weights):
            raise ValueError("DropLoss needs one regressed box per proposal: use CLS_AGNOSTIC_BBOX_REG")

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["droploss_enabled"] = cfg.MODEL.ROI_HEADS.DROPLOSS.ENABLED
        ret["droploss_iou_thresh"] = cfg.MODEL.ROI_HEADS.DROPLOSS.IOU_THRESH
        return ret

    @torch.no_grad()
    def proposal_weights(self, predictions, proposals: list[Instances]) -> torch.Tensor:
        """DropLoss weight of every proposal, concatenated over images like ``losses`` does: (N,) float."""
        weights = []
        for boxes, props in zip(self.predict_boxes(predictions, proposals), proposals, strict=True):
            if not props.has(IMAGE_GT_BOXES):
                raise KeyError(
                    f"proposals lack '{IMAGE_GT_BOXES}': "
                    "use the DropLoss ROI heads of stages/detection/droploss.py"
                )
            if len(props) == 0:
                weights.append(boxes.new_zeros(0))
                continue
            gt = props.get(IMAGE_GT_BOXES)[0]  # every row holds the same (G, 4) set
            weights.append(droploss_weights(boxes.detach(), gt, self.droploss_iou_thresh))
        return cat(weights, dim=0)

    def losses(self, predictions, proposals):
        """Stock losses, with ``loss_cls`` replaced by the DropLoss-weighted mean when enabled."""
        losses = super().losses(predictions, proposals)
        scores, _ = predictions
        if not self.droploss_enabled or scores.shape[0] == 0:
            return losses
        weights = self.proposal_weights(predictions, proposals)
        gt_classes = cat([p.gt_classes for p in proposals], dim=0)
        per_proposal = F.cross_entropy(scores, gt_classes, reduction="none")
        loss_cls = (weights * per_proposal).sum() / per_proposal.numel()
        losses["loss_cls"] = loss_cls * self.loss_weight.get("loss_cls", 1.0)
        get_event_storage().put_scalar("fast_rcnn/droploss_kept_fraction", weights.mean().item())
        return losses


class _ImageGtBoxesMixin:
    """Adds :data:`IMAGE_GT_BOXES` to the proposals sampled for the (first-stage) box head."""

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals, targets):
        return attach_image_gt_boxes(super().label_and_sample_proposals(proposals, targets), targets)


@ROI_HEADS_REGISTRY.register()
class DropLossROIHeads(_ImageGtBoxesMixin, StandardROIHeads):
    """``StandardROIHeads`` (Mask R-CNN) whose box predictor applies DropLoss when enabled in the config."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        if cfg.MODEL.ROI_HEADS.DROPLOSS.ENABLED:
            stock = ret["box_predictor"]
            ret["box_predictor"] = DropLossFastRCNNOutputLayers(
                cfg, ret["box_head"].output_shape, box2box_transform=stock.box2box_transform
            )
        return ret


@ROI_HEADS_REGISTRY.register()
class DropLossCascadeROIHeads(_ImageGtBoxesMixin, CascadeROIHeads):
    """``CascadeROIHeads`` whose box predictor of every stage applies DropLoss when enabled in the config."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        if cfg.MODEL.ROI_HEADS.DROPLOSS.ENABLED:
            ret["box_predictors"] = [
                # Each stage keeps its own box2box_transform (the cascade's per-stage regression weights).
                DropLossFastRCNNOutputLayers(
                    cfg, head.output_shape, box2box_transform=stock.box2box_transform
                )
                for head, stock in zip(ret["box_heads"], ret["box_predictors"], strict=True)
            ]
        return ret

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        # Stages >= 1 relabel the previous stage's boxes; they need the image's pseudo-boxes as well.
        return attach_image_gt_boxes(super()._match_and_label_boxes(proposals, stage, targets), targets)
