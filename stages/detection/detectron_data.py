"""detectron2's training data read with the project's image decoder.

detectron2's own reader (``detection_utils.read_image``) converts images with Pillow alone: a 12-bit PNG
comes out nearly white, a 16-bit colour file cut to its top byte. Every other stage reads with
``stages.common.io.load_rgb``; this mapper makes training (and the copy-paste loader built on it) see the same
pixels, through detectron2's extension point for data loading (a ``DatasetMapper`` passed to
``build_detection_train_loader``), detectron2 itself untouched.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from stages.common.io import load_rgb
from stages.detection.soft_target import GT_SCORES, annotation_scores


def read_image(path: str, image_format: str) -> np.ndarray:
    """An image file as (H, W, 3) uint8 in detectron2's ``INPUT.FORMAT`` ('RGB' or 'BGR'), decoded by
    ``load_rgb``."""
    rgb = load_rgb(path)
    if image_format == "RGB":
        return rgb
    if image_format == "BGR":
        return np.ascontiguousarray(rgb[:, :, ::-1])
    raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for this project's reader, got '{image_format}'")


class ImageMapper(DatasetMapper):
    """``DatasetMapper`` whose image comes from :func:`read_image`; augmentation and annotation handling are
    detectron2's, plus the annotations' scores: ``instances.gt_scores`` (float32, one per instance, 1.0 for
    an annotation without ``score``; see ``stages/detection/soft_target.py``; checked to lie in [0, 1] when
    ``MODEL.ROI_HEADS.SOFT_TARGET`` is on). Semantic segmentation files and precomputed proposals (unused
    here) are refused."""

    @configurable
    def __init__(self, is_train: bool = True, *, check_scores: bool = False, **kwargs):
        """``DatasetMapper``'s arguments, plus whether the annotations' scores must lie in [0, 1]."""
        super().__init__(is_train, **kwargs)
        self.check_scores = check_scores

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["check_scores"] = bool(cfg.MODEL.ROI_HEADS.get("SOFT_TARGET", False))
        return ret

    def _transform_annotations(self, dataset_dict: dict, transforms, image_shape) -> None:
        # detectron2's DatasetMapper._transform_annotations with the scores set before the empty instances
        # are filtered out (the filter returns the kept rows of every field, scores included).
        for anno in dataset_dict["annotations"]:
            if not self.use_instance_mask:
                anno.pop("segmentation", None)
            if not self.use_keypoint:
                anno.pop("keypoints", None)
        annos = [
            utils.transform_instance_annotations(
                obj, transforms, image_shape, keypoint_hflip_indices=self.keypoint_hflip_indices
            )
            for obj in dataset_dict.pop("annotations")
            if obj.get("iscrowd", 0) == 0
        ]
        for anno in annos:
            # detectron2's resize returns masks as read-only views of a PIL image, which torch warns about
            # (and could not write to): give it its own copy.
            segm = anno.get("segmentation")
            if isinstance(segm, np.ndarray) and not segm.flags.writeable:
                anno["segmentation"] = segm.copy()
        instances = utils.annotations_to_instances(annos, image_shape, mask_format=self.instance_mask_format)
        instances.set(GT_SCORES, annotation_scores(annos, check=self.check_scores))
        if self.recompute_boxes:
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)

    def __call__(self, dataset_dict: dict) -> dict:
        if "sem_seg_file_name" in dataset_dict or self.proposal_topk is not None:
            raise ValueError("ImageMapper maps instance annotations only (no sem_seg, no proposals)")
        dataset_dict = copy.deepcopy(dataset_dict)  # modified below
        image = read_image(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        # A tensor, not an array: detectron2's loader moves tensors through shared memory.
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
        elif "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict
