"""Deep Spectral Methods: feature + colour/position affinity, Laplacian eigenvectors, object and segments."""

import numpy as np
import pytest
import torch

from stages.discovery.deep_spectral import (
    deep_spectral,
    fiedler_foreground,
    knn_affinity,
    node_grid,
    spectral_segments,
)
from stages.discovery.ncut import treat_keys
from tests.scenes import biased_scene, box_mask, iou, scene_image

GRID = (16, 20)
PATCH = 8
# DSM's defaults: lambda_knn 10, one node per patch, 4 segments
LAMBDA, SEGMENTS = 10.0, 4


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def run(scene, image, lambda_knn=LAMBDA, downsample=PATCH, k=3, segments=SEGMENTS):
    keys = treat_keys(scene.keys, "no_bias", scene.bias)
    return deep_spectral(keys, scene.grid, image, PATCH, lambda_knn, downsample, k, segments, "fast")


def test_finds_the_object_and_segments_several():
    scene = biased_scene(GRID, [(3, 2, 10, 8), (6, 12, 14, 18)], noise=0.4, shared=-0.2, seed=1)
    result = run(scene, scene_image(GRID, PATCH, scene.truth))
    assert max(iou(result.object, t) for t in scene.truth) >= 0.85  # localisation: one object, boxed
    objects = result.objects()
    for t in scene.truth:  # the segments hold every object
        assert max(iou(m, t) for m in objects) >= 0.8
    assert result.segments.shape == GRID and result.segments[0, 0] == 0  # 0: the border's segment


def test_colour_affinity_finds_what_the_features_barely_show():
    """Keys where the object is nearly drowned in noise, a picture where it is plain: lambda_knn 10 finds
    it, the features alone do not."""
    scene = biased_scene(GRID, [(4, 5, 12, 13)], noise=2.2, shared=0.8, seed=2)
    image = scene_image(GRID, PATCH, scene.truth)
    assert iou(run(scene, image).object, scene.truth[0]) >= 0.8
    assert iou(run(scene, image, lambda_knn=0.0).object, scene.truth[0]) < 0.5


def test_sub_patch_nodes():
    scene = biased_scene(GRID, [(4, 5, 12, 13)], noise=0.4, shared=-0.2, seed=3)
    image = scene_image(GRID, PATCH, scene.truth)
    result = run(scene, image, downsample=PATCH // 2)
    fine_truth = scene.truth[0].repeat(2, axis=0).repeat(2, axis=1)
    assert result.object.shape == (32, 40) and iou(result.object, fine_truth) >= 0.85
    assert node_grid(GRID, PATCH, PATCH // 2) == (32, 40)
    with pytest.raises(ValueError, match="must divide"):
        node_grid(GRID, PATCH, 3)


def test_needs_the_image_for_colour():
    scene = biased_scene(GRID, [(4, 5, 12, 13)], seed=4)
    with pytest.raises(ValueError, match="needs the image"):
        run(scene, None)
    assert run(scene, None, lambda_knn=0.0).object.any()


def test_the_object_is_the_smaller_side():
    v = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0, -1.0])  # positive on 4 of 6 nodes: the object is the rest
    assert fiedler_foreground(v, (2, 3)).reshape(-1).tolist() == [False, False, False, True, False, True]
    assert fiedler_foreground(-torch.ones(6), (2, 3)).all()  # nothing positive: the whole grid


def test_knn_affinity_links_similar_colours_nearby():
    image = np.zeros((10, 12, 3))
    image[:, 6:] = (1.0, 0.0, 0.0)  # two flat halves
    w = knn_affinity(image)
    assert torch.equal(w, w.T) and bool((w >= 0).all())
    assert int((w > 0).sum(dim=1).min()) >= 20  # every node links to at least its 20 neighbours
    left = torch.from_numpy(np.tile(np.arange(12) < 6, 10))
    across = float(w[left][:, ~left].sum())
    assert across < 0.05 * float(w.sum())  # colour keeps the halves apart


def test_segments_put_the_border_segment_first():
    vectors = torch.zeros(1, 30)
    labels = np.zeros((5, 6), int)
    labels[1:4, 1:3], labels[1:4, 3:5] = 1, 2
    vectors[0] = torch.from_numpy(labels.reshape(-1) * 1.0)
    segments = spectral_segments(vectors, (5, 6), 3, seed=0)
    assert segments[0, 0] == 0 and len(np.unique(segments)) == 3
    assert np.array_equal(segments == 0, labels == 0)


def test_real_size_grid():
    """ViT-S/16 on a 480x640 image: 30x40 patches, with the colour affinity."""
    grid = (30, 40)
    scene = biased_scene(grid, [(6, 8, 20, 22), (10, 26, 24, 36)], noise=0.5, shared=-0.2, seed=5)
    image = scene_image(grid, PATCH, scene.truth)
    keys = treat_keys(scene.keys, "no_bias", scene.bias)
    result = deep_spectral(keys, grid, image, PATCH, LAMBDA, PATCH, 3, SEGMENTS, "fast")
    assert max(iou(result.object, t) for t in scene.truth) >= 0.85
    assert box_mask(grid, (0, 0, 1, 1)).shape == result.object.shape
