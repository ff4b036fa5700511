"""CuVLER's soft target loss (Arica et al., CVPR 2024, "CuVLER: Enhanced Unsupervised Object Discoveries
through Exhaustive Self-Supervised Transformers") as detectron2 pieces.

VoteCut gives each pseudo-mask a score in [0, 1], the share of the candidate masks that voted for it; a
self-training round's labels carry the detector's own score. CuVLER trains the detector on that confidence
instead of on a hard "this is an object": a proposal matched to a label of score s gets the classification
target (object: s, background: 1 - s) instead of (1, 0), and its box-regression and mask losses are
multiplied by s. Background proposals keep the hard background target whatever the score of the label they
were compared with. With every score 1 the three losses are the stock ones.

As in CuVLER's code (its ``cad`` detectron2 changes, ``MODEL.ROI_HEADS.USE_SOFT_TARGETS``):
- the score of an annotation comes from its COCO ``score``; a label file without any score (MaskCut,
  TokenCut, LOST) counts every label as score 1, so the option changes nothing there. A file that scores
  only some labels gives the others 1 (CuVLER's code would fail on such a file);
- the classification term is the soft-target cross-entropy, multiplied by the DropLoss weight when DropLoss
  is on, averaged over all sampled proposals (DropLoss's normalisation);
- every cascade stage uses the score of the label its proposals are matched to at that stage (CuVLER's
  public cascade code sets a field named ``gt_weights`` at stages 1 and 2 but its losses read
  ``gt_scores``: the intent, one matched score per proposal at each stage, is what is done here);
- the RPN is untouched.

Pieces: :func:`annotation_scores` (annotations -> the ``gt_scores`` field of an image's ``Instances``),
:func:`soft_cross_entropy`, :func:`scored_box_reg_loss` and :func:`scored_mask_loss` (the losses, pure
functions), :func:`attach_matched_scores` (a cascade stage's labelling),
:class:`ScoredMaskRCNNConvUpsampleHead` (the mask head, registered). The box predictor and the ROI heads
that use them are in ``stages/detection/droploss.py``; the config key ``MODEL.ROI_HEADS.SOFT_TARGET`` in
``stages/detection/detectron_config.py``.
"""

from __future__ import annotations

import math

import torch
from detectron2.layers import cat, ciou_loss, diou_loss, nonzero_tuple
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY, MaskRCNNConvUpsampleHead
from detectron2.structures import Instances, pairwise_iou
from fvcore.nn import giou_loss, smooth_l1_loss
from torch.nn import functional as F

# detectron2's box losses other than smooth L1, by BBOX_REG_LOSS_TYPE; each takes reduction="none".
_IOU_LOSSES = {"giou": giou_loss, "diou": diou_loss, "ciou": ciou_loss}

# Per-instance field of the targets (and, after matching, of the proposals): the label's score, (n,) float.
GT_SCORES = "gt_scores"
# The COCO annotation key it is read from (VoteCut, FreeMask and detector predictions write it).
SCORE_KEY = "score"


def annotation_scores(annotations: list[dict], check: bool = True) -> torch.Tensor:
    """(n,) float32 scores of an image's annotations, in order: ``score`` where given, else 1.0.

    With ``check``, raises ValueError naming the value when a score is not a number in [0, 1] (without
    it, the scores are carried as they are: they are only read by the soft target loss).
    """
    scores = [float(a.get(SCORE_KEY, 1.0)) for a in annotations]
    bad = [s for s in scores if not (math.isfinite(s) and 0.0 <= s <= 1.0)]
    if check and bad:
        raise ValueError(f"annotation '{SCORE_KEY}' must be in [0, 1] for the soft target loss, got {bad[0]}")
    return torch.tensor(scores, dtype=torch.float32)


def proposal_scores(proposals: list[Instances], device: torch.device) -> torch.Tensor:
    """The matched labels' scores of all proposals, concatenated over images: (N,) float.

    An image without labels gives its proposals no ``gt_scores`` (detectron2 copies target fields only
    where there is a target); they are all background, whose target ignores the score: 1.0 is used.
    """
    return cat(
        [
            p.get(GT_SCORES).to(device) if p.has(GT_SCORES) else torch.ones(len(p), device=device)
            for p in proposals
        ],
        dim=0,
    )


def soft_cross_entropy(logits: torch.Tensor, gt_classes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Per-proposal cross-entropy against CuVLER's soft targets.

    Args:
        logits: (N, K + 1) class logits, background last (detectron2's layout).
        gt_classes: (N,) int64 in [0, K]; K is background.
        scores: (N,) float in [0, 1], the matched label's score (ignored for background proposals).

    Returns:
        (N,) float: ``-(s log p_c + (1 - s) log p_bg)`` for a proposal of class c < K, ``-log p_bg`` for a
        background one. With s = 1 this is ``F.cross_entropy(logits, gt_classes, reduction="none")``.
    """
    background = logits.shape[1] - 1
    fg = (gt_classes != background).to(logits.dtype)
    s = scores.to(logits.dtype).detach() * fg
    log_p = F.log_softmax(logits, dim=1)
    log_p_class = log_p.gather(1, gt_classes.unsqueeze(1)).squeeze(1)
    return -(s * log_p_class + (1 - s) * log_p[:, background])


def scored_box_reg_loss(
    predictor, proposal_boxes, gt_boxes, pred_deltas, gt_classes, scores: torch.Tensor
) -> torch.Tensor:
    """detectron2's ``FastRCNNOutputLayers.box_reg_loss`` with each foreground proposal's loss multiplied
    by its label's score: ``sum_fg s_i * loss_i / N`` (N = all sampled proposals, detectron2's
    normalisation).

    Args:
        predictor: the ``FastRCNNOutputLayers`` (its ``num_classes``, ``box2box_transform``,
            ``box_reg_loss_type``, ``smooth_l1_beta``).
        proposal_boxes, gt_boxes: (N, 4) XYXY; pred_deltas: (N, 4) or (N, K * 4); gt_classes: (N,);
        scores: (N,) float.
    """
    box_dim = proposal_boxes.shape[1]
    fg = nonzero_tuple((gt_classes >= 0) & (gt_classes < predictor.num_classes))[0]
    if pred_deltas.shape[1] == box_dim:  # class-agnostic regression
        fg_deltas = pred_deltas[fg]
    else:
        fg_deltas = pred_deltas.view(-1, predictor.num_classes, box_dim)[fg, gt_classes[fg]]
    transform = predictor.box2box_transform
    if predictor.box_reg_loss_type == "smooth_l1":
        target = transform.get_deltas(proposal_boxes[fg], gt_boxes[fg])
        per_box = smooth_l1_loss(fg_deltas, target, predictor.smooth_l1_beta, reduction="none").sum(dim=1)
    elif predictor.box_reg_loss_type in _IOU_LOSSES:
        boxes = transform.apply_deltas(fg_deltas, proposal_boxes[fg])
        per_box = _IOU_LOSSES[predictor.box_reg_loss_type](boxes, gt_boxes[fg], reduction="none")
    else:
        raise ValueError(f"unknown BBOX_REG_LOSS_TYPE '{predictor.box_reg_loss_type}'")
    return (scores[fg].detach().to(per_box.dtype) * per_box).sum() / max(gt_classes.numel(), 1.0)


def scored_mask_loss(pred_mask_logits: torch.Tensor, instances: list[Instances]) -> torch.Tensor:
    """detectron2's ``mask_rcnn_loss`` with each mask's loss multiplied by its label's score.

    Args:
        pred_mask_logits: (B, C, M, M) mask logits of the B foreground proposals (C = 1: class-agnostic).
        instances: per image, the foreground proposals (``proposal_boxes``, ``gt_masks``, ``gt_classes``,
            ``gt_scores``; without ``gt_scores``, 1.0).

    Returns:
        ``sum_i s_i * mean over the M x M pixels of BCE_i / B``; with every s = 1, the stock loss.
    """
    side = pred_mask_logits.shape[2]
    instances = [x for x in instances if len(x)]
    if not instances:
        return pred_mask_logits.sum() * 0
    gt_masks = cat([x.gt_masks.crop_and_resize(x.proposal_boxes.tensor, side) for x in instances])
    gt_masks = gt_masks.to(device=pred_mask_logits.device, dtype=torch.float32)
    if pred_mask_logits.shape[1] == 1:
        logits = pred_mask_logits[:, 0]
    else:
        classes = cat([x.gt_classes for x in instances]).to(torch.int64)
        logits = pred_mask_logits[torch.arange(len(classes)), classes]
    per_mask = F.binary_cross_entropy_with_logits(logits, gt_masks, reduction="none").mean(dim=(1, 2))
    scores = proposal_scores(instances, per_mask.device).detach().to(per_mask.dtype)
    return (scores * per_mask).sum() / per_mask.numel()


@ROI_MASK_HEAD_REGISTRY.register()
class ScoredMaskRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """``MaskRCNNConvUpsampleHead`` (same layers, same weights' names) whose training loss is
    :func:`scored_mask_loss`. Inference is stock. The soft-target ROI heads build it in place of the stock
    head; it is not meant to be named in a config."""

    def forward(self, x, instances: list[Instances]):
        if not self.training:
            return super().forward(x, instances)
        return {"loss_mask": scored_mask_loss(self.layers(x), instances) * self.loss_weight}


@torch.no_grad()
def attach_matched_scores(proposals: list[Instances], targets: list[Instances], matcher) -> list[Instances]:
    """Set ``gt_scores`` on a cascade stage's proposals (in place), the score of the target each is matched
    to by ``matcher`` (the stage's ``Matcher``); background proposals get their best target's score too,
    unused. Targets without ``gt_scores`` leave their proposals without it.

    detectron2's ``CascadeROIHeads._match_and_label_boxes`` labels the proposals but does not return the
    matched indices; the matcher is deterministic, so matching the same IoU matrix again gives the same
    indices.
    """
    for props, target in zip(proposals, targets, strict=True):
        if not target.has(GT_SCORES):
            continue
        if len(target) == 0:
            props.set(GT_SCORES, torch.ones(len(props), device=props.proposal_boxes.device))
            continue
        matched, _ = matcher(pairwise_iou(target.gt_boxes, props.proposal_boxes))
        props.set(GT_SCORES, target.get(GT_SCORES)[matched])
    return proposals
