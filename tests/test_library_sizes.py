"""The pycocotools and detectron2 paths the project uses, at realistic sizes under numpy 2 (the audit of
issue 9, kept as a guard for library upgrades): pycocotools' own area() fails from 256 RLEs, the rest must
work with hundreds of masks per call, per image and per file."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from stages.common import rle
from stages.common.export import coco_file, mask_annotation
from stages.evaluation.coco_ap import evaluate_ap, ground_truth_as_detections

N = 300  # past every 8-bit count


def blobs(n: int, size=(375, 500), seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.zeros(size, bool)
        y, x = rng.integers(0, size[0] - 60), rng.integers(0, size[1] - 60)
        mask[y : y + rng.integers(5, 60), x : x + rng.integers(5, 60)] = True
        out.append(mask)
    return out


@pytest.fixture(scope="module")
def masks():
    return blobs(N)


@pytest.fixture(scope="module")
def coded(masks):
    return mask_utils.encode(np.asfortranarray(np.stack(masks, axis=2).astype(np.uint8)))


def test_pycocotools_area_fails_from_256_rles_and_the_wrapper_does_not(coded, masks):
    # If this starts passing, pycocotools is fixed and rle.area's chunking can go.
    with pytest.raises(OverflowError):
        mask_utils.area(coded)
    assert rle.area(coded).tolist() == [int(m.sum()) for m in masks]


def test_pycocotools_calls_with_hundreds_of_masks(coded, masks):
    assert mask_utils.decode(coded).shape == (375, 500, N)
    assert mask_utils.toBbox(coded).shape == (N, 4)
    assert mask_utils.iou(coded, coded, [0] * N).shape == (N, N)
    assert mask_utils.iou(coded, coded, [1] * N).shape == (N, N)  # crowd ground truth
    union = mask_utils.decode(mask_utils.merge(coded)).astype(bool)
    assert np.array_equal(union, np.any(masks, axis=0))
    polygons = mask_utils.frPyObjects([[10, 10, 60, 10, 60, 50, 10, 50]] * N, 375, 500)
    assert len(polygons) == N and rle.area(polygons).tolist() == [2000] * N
    boxes = mask_utils.frPyObjects(np.tile([[10.0, 10.0, 50.0, 40.0]], (N, 1)), 375, 500)
    assert rle.area(boxes).tolist() == [2000] * N


def ground_truth(n_images: int, per_image: int) -> dict:
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 375, "width": 500} for i in range(1, n_images + 1)]
    masks = blobs(per_image, seed=1)
    anns = [mask_annotation(masks[k], im["id"]) for im in images for k in range(per_image)]
    return coco_file(images, anns)


@pytest.mark.parametrize("n_images, per_image", [(400, 3), (1, N)])
def test_cocoeval_over_many_images_and_many_detections_per_image(n_images, per_image):
    gt = ground_truth(n_images, per_image)
    ap = evaluate_ap(gt, ground_truth_as_detections(gt), max_dets=N)
    assert ap["bbox"]["AP"] == 1.0 and ap["segm"]["AP"] == 1.0


def test_detectron2_loads_and_maps_hundreds_of_annotations(tmp_path):
    # (Its Visualizer was checked with 300 masks too; overlays draw at most a few, so it is not kept here.)
    from detectron2.data import detection_utils, transforms
    from detectron2.data.datasets import load_coco_json
    from detectron2.structures import BoxMode

    gt = ground_truth(2, N)
    (tmp_path / "labels.json").write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = load_coco_json(str(tmp_path / "labels.json"), str(tmp_path), "many")
    assert [len(d["annotations"]) for d in dataset] == [N] * 2
    resize = transforms.TransformList([transforms.ResizeTransform(375, 500, 200, 266)])
    anns = [
        detection_utils.transform_instance_annotations(
            {**a, "bbox_mode": BoxMode.XYWH_ABS}, resize, (200, 266)
        )
        for a in dataset[0]["annotations"]
    ]
    instances = detection_utils.annotations_to_instances(anns, (200, 266), mask_format="bitmask")
    assert instances.gt_masks.tensor.shape == (N, 200, 266)
