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
  ``MODEL.ROI_HEADS.DROPLOSS.ENABLED`` or ``MODEL.ROI_HEADS.SOFT_TARGET`` and give each sampled proposal a
  view of *all* pseudo-boxes of its image (field :data:`IMAGE_GT_BOXES`), because the stock labelling keeps
  only the matched box. With ``SOFT_TARGET`` they also give every cascade stage's proposals their matched
  label's score and build the score-weighted mask head (CuVLER's soft target loss,
  ``stages/detection/soft_target.py``).

Difference from CutLER's code, kept on purpose: its cascade heads compare each proposal with only the first
u of the proposals' *matched* boxes, u = the number of distinct boxes among the first 100 proposals'
matches (a side effect of how it indexes them), so some pseudo-boxes can be missing from the comparison and
others repeated. Here every proposal is compared with all pseudo-boxes of its image, the paper's definition
and SPEC's; a proposal can then only be kept where CutLER's code would drop it, never the reverse.

Use: ``import stages.detection.droploss`` (registers the heads), ``add_cutler_config(cfg)``, then
``cfg.MODEL.ROI_HEADS.NAME = "DropLossCascadeROIHeads"`` (or ``"DropLossROIHeads"``).
With DropLoss and the soft target disabled these heads build and train exactly like the stock ones.
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

from stages.detection.soft_target import (
    attach_matched_scores,
    proposal_scores,
    scored_box_reg_loss,
    soft_cross_entropy,
)

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
    """``FastRCNNOutputLayers`` with DropLoss on the classification loss and, optionally, CuVLER's soft
    targets (``stages/detection/soft_target.py``).

    With DropLoss enabled: ``loss_cls = sum_i w_i * CE_i / N`` over all N sampled proposals of the batch
    (dropped ones count in N), ``w_i`` from :func:`droploss_weights` on the proposal's regressed box
    (``predict_boxes``, detached, not clipped) and all pseudo-boxes of its image. ``loss_box_reg`` and the
    logged statistics are stock. Soft target on: ``CE_i`` is :func:`soft_cross_entropy` against the matched
    label's score (``gt_scores``) and ``loss_box_reg`` is :func:`scored_box_reg_loss`; with DropLoss on as
    well, ``loss_cls = sum_i w_i * softCE_i / N`` (CuVLER's combination). Both disabled: ``losses`` is
    exactly ``FastRCNNOutputLayers.losses``.

    Needs the proposals' :data:`IMAGE_GT_BOXES` field (set by the DropLoss ROI heads), one regressed box per
    proposal (class-agnostic regression or one class) and softmax cross-entropy.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        droploss_enabled: bool,
        droploss_iou_thresh: float,
        soft_target: bool = False,
        **kwargs,
    ):
        """Same arguments as ``FastRCNNOutputLayers``, plus the two ``MODEL.ROI_HEADS.DROPLOSS`` values and
        ``MODEL.ROI_HEADS.SOFT_TARGET``."""
        super().__init__(input_shape, **kwargs)
        self.droploss_enabled = droploss_enabled
        self.droploss_iou_thresh = droploss_iou_thresh
        self.soft_target = soft_target
        for name, on in (("DropLoss", droploss_enabled), ("The soft target loss", soft_target)):
            if on and self.use_sigmoid_ce:
                raise ValueError(f"{name} needs softmax cross-entropy (USE_SIGMOID_CE=False)")
        if droploss_enabled and self.bbox_pred.out_features != len(self.box2box_transform.weights):
            raise ValueError("DropLoss needs one regressed box per proposal: use CLS_AGNOSTIC_BBOX_REG")

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["droploss_enabled"] = cfg.MODEL.ROI_HEADS.DROPLOSS.ENABLED
        ret["droploss_iou_thresh"] = cfg.MODEL.ROI_HEADS.DROPLOSS.IOU_THRESH
        ret["soft_target"] = cfg.MODEL.ROI_HEADS.SOFT_TARGET
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
        """Stock losses, with ``loss_cls`` replaced by the DropLoss-weighted mean when DropLoss is on, and
        ``loss_cls`` and ``loss_box_reg`` by their soft-target versions when the soft target is on."""
        losses = super().losses(predictions, proposals)
        scores, deltas = predictions
        if not (self.droploss_enabled or self.soft_target) or scores.shape[0] == 0:
            return losses
        gt_classes = cat([p.gt_classes for p in proposals], dim=0)
        if self.soft_target:
            gt_scores = proposal_scores(proposals, scores.device)
            per_proposal = soft_cross_entropy(scores, gt_classes, gt_scores)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals], dim=0
            )  # stock's placeholder for images without labels (all background: no box loss)
            loss_box = scored_box_reg_loss(self, proposal_boxes, gt_boxes, deltas, gt_classes, gt_scores)
            losses["loss_box_reg"] = loss_box * self.loss_weight.get("loss_box_reg", 1.0)
        else:
            per_proposal = F.cross_entropy(scores, gt_classes, reduction="none")
        if self.droploss_enabled:
            weights = self.proposal_weights(predictions, proposals)
            per_proposal = weights * per_proposal
            get_event_storage().put_scalar("fast_rcnn/droploss_kept_fraction", weights.mean().item())
        loss_cls = per_proposal.sum() / per_proposal.numel()
        losses["loss_cls"] = loss_cls * self.loss_weight.get("loss_cls", 1.0)
        return losses


def _custom_losses(cfg) -> bool:
    """Whether the box predictor must be ours: DropLoss or the soft target is on."""
    return cfg.MODEL.ROI_HEADS.DROPLOSS.ENABLED or cfg.MODEL.ROI_HEADS.SOFT_TARGET


# The stock mask head and its soft-target version (same layers, loss weighted by the labels' scores).
_STOCK_MASK_HEAD, _SCORED_MASK_HEAD = "MaskRCNNConvUpsampleHead", "ScoredMaskRCNNConvUpsampleHead"


class _ImageGtBoxesMixin:
    """Adds :data:`IMAGE_GT_BOXES` to the proposals sampled for the (first-stage) box head (their
    ``gt_scores``, when the targets have them, are copied by detectron2 with every other ``gt_`` field), and
    builds the score-weighted mask head when the soft target is on."""

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals, targets):
        return attach_image_gt_boxes(super().label_and_sample_proposals(proposals, targets), targets)

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        if cfg.MODEL.MASK_ON and cfg.MODEL.ROI_HEADS.SOFT_TARGET:
            if cfg.MODEL.ROI_MASK_HEAD.NAME != _STOCK_MASK_HEAD:
                raise ValueError(
                    f"MODEL.ROI_HEADS.SOFT_TARGET weights the mask loss of {_STOCK_MASK_HEAD} only, "
                    f"got MODEL.ROI_MASK_HEAD.NAME '{cfg.MODEL.ROI_MASK_HEAD.NAME}'"
                )
            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.ROI_MASK_HEAD.NAME = _SCORED_MASK_HEAD
        return super()._init_mask_head(cfg, input_shape)


@ROI_HEADS_REGISTRY.register()
class DropLossROIHeads(_ImageGtBoxesMixin, StandardROIHeads):
    """``StandardROIHeads`` (Mask R-CNN) whose box predictor applies DropLoss and whose box predictor and
    mask head apply the soft target when enabled in the config."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        if _custom_losses(cfg):
            stock = ret["box_predictor"]
            ret["box_predictor"] = DropLossFastRCNNOutputLayers(
                cfg, ret["box_head"].output_shape, box2box_transform=stock.box2box_transform
            )
        return ret


@ROI_HEADS_REGISTRY.register()
class DropLossCascadeROIHeads(_ImageGtBoxesMixin, CascadeROIHeads):
    """``CascadeROIHeads`` whose box predictor of every stage applies DropLoss, and whose box predictors and
    mask head apply the soft target, when enabled in the config."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        if _custom_losses(cfg):
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
        # Stages >= 1 relabel the previous stage's boxes; they need the image's pseudo-boxes as well, and with
        # the soft target the score of the label each box is now matched to.
        proposals = attach_image_gt_boxes(super()._match_and_label_boxes(proposals, stage, targets), targets)
        if getattr(self.box_predictor[stage], "soft_target", False):
            proposals = attach_matched_scores(proposals, targets, self.proposal_matchers[stage])
        return proposals
