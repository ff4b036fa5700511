"""The config keys this project adds to detectron2, with their defaults (SPEC "CutLER training").

Call :func:`add_cutler_config` on a fresh ``get_cfg()`` before merging a YAML from ``detectron_configs/``.
"""

from __future__ import annotations

from detectron2.config import CfgNode, get_cfg


def cutler_cfg() -> CfgNode:
    """detectron2's default config with the CutLER keys added and our ROI heads registered: the base that
    every YAML in ``detectron_configs/`` and every detector directory's config is merged onto."""
    import stages.detection.droploss  # noqa: F401  (registers the ROI heads the YAML files name)
    from stages.detection.vitdet import add_vitdet_config  # importing it registers the ViTDet backbone

    cfg = get_cfg()
    add_cutler_config(cfg)
    add_vitdet_config(cfg)
    return cfg


def add_cutler_config(cfg: CfgNode) -> None:
    """Add the CutLER keys to a detectron2 config, in place.

    - ``MODEL.ROI_HEADS.DROPLOSS.ENABLED``: drop the classification loss of proposals that overlap no
      pseudo-box (used by the ROI heads of ``stages/detection/droploss.py``). Off by default, like every
      optional detectron2 feature: the round-0 YAML turns it on, self-training rounds leave it off.
    - ``MODEL.ROI_HEADS.DROPLOSS.IOU_THRESH``: a proposal whose regressed box has max IoU <= this with every
      pseudo-box of its image gets weight 0 in the classification loss.
    - ``MODEL.ROI_HEADS.SOFT_TARGET``: CuVLER's soft target loss (Arica et al., CVPR 2024;
      ``stages/detection/soft_target.py``): a proposal matched to a label of score s (the annotation's
      ``score``, 1 without one) has the classification target (object s, background 1 - s) and its box and
      mask losses weighted by s, at every cascade stage. Off by default (CutLER's loss); needs our ROI heads.
    - ``INPUT.COPY_PASTE.ENABLED``: apply the batch-level copy-paste of ``stages/detection/copy_paste.py``.
    - ``INPUT.COPY_PASTE.RATIO_RANGE``: (low, high) <= 1 of the uniform ratio of a pasted source image's
      size to the target image's size (round 0; self-training rounds use (0.5, 1.0) in their YAML).
    - ``INPUT.COPY_PASTE.MAX_OCCLUSION``: an object that would cover this fraction or more of an existing
      mask is not pasted (CutLER's code: 0.5); existing masks are dropped only when fully covered.
    """
    cfg.MODEL.ROI_HEADS.DROPLOSS = CfgNode()
    cfg.MODEL.ROI_HEADS.DROPLOSS.ENABLED = False
    cfg.MODEL.ROI_HEADS.DROPLOSS.IOU_THRESH = 0.01
    cfg.MODEL.ROI_HEADS.SOFT_TARGET = False

    cfg.INPUT.COPY_PASTE = CfgNode()
    cfg.INPUT.COPY_PASTE.ENABLED = False
    cfg.INPUT.COPY_PASTE.RATIO_RANGE = (0.3, 1.0)
    cfg.INPUT.COPY_PASTE.MAX_OCCLUSION = 0.5
