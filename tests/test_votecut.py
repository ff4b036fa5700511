"""VoteCut: candidates from eigenvectors, IoU voting, per-mask agreement scores."""

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from stages.discovery.ncut import binary_affinity, smallest_eigenvectors, treat_keys
from stages.discovery.votecut import eigenvector_candidates, iou_clusters, votecut
from tests.scenes import biased_scene, box_mask, iou

GRID = (20, 24)
# CuVLER's code: IoU 0.6, 5 pivot moves, tau_m 0.2, 10 masks; ours: at least 2 votes
VOTE = dict(iou_threshold=0.6, pivot_moves=5, tau_m=0.2, max_masks=10, min_votes=2)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def jitter(mask: np.ndarray, rng: np.random.Generator, flips: int = 4) -> np.ndarray:
    """The mask with ``flips`` patches of its boundary ring (just inside or just outside) flipped: a
    candidate from another source."""
    from scipy import ndimage

    ring = np.argwhere(ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask))
    out = mask.copy()
    for y, x in ring[rng.choice(len(ring), flips, replace=False)]:
        out[y, x] ^= True
    return out


def test_keeps_the_mask_most_candidates_agree_on_and_drops_an_outlier():
    rng = np.random.default_rng(0)
    obj = box_mask(GRID, (4, 5, 13, 14))
    outlier = box_mask(GRID, (14, 16, 19, 23))
    candidates = [jitter(obj, rng) for _ in range(5)] + [outlier]
    voted = votecut(candidates, GRID, **VOTE)
    assert len(voted) == 1
    assert voted[0].votes == 5 and voted[0].score == 1.0 and iou(voted[0].mask, obj) >= 0.9
    # with CuVLER's own rule (every cluster kept) the outlier comes back, with a fifth of the score
    everything = votecut(candidates, GRID, **{**VOTE, "min_votes": 1})
    assert [v.votes for v in everything] == [5, 1] and everything[1].score == pytest.approx(0.2)
    assert iou(everything[1].mask, outlier) == 1.0


def test_two_objects_each_with_their_votes():
    rng = np.random.default_rng(1)
    a, b = box_mask(GRID, (2, 2, 9, 9)), box_mask(GRID, (10, 12, 18, 22))
    candidates = [jitter(a, rng) for _ in range(4)] + [jitter(b, rng) for _ in range(2)] + [a | b]
    voted = votecut(candidates, GRID, **VOTE)
    assert [v.votes for v in voted] == [4, 2] and [v.score for v in voted] == [1.0, 0.5]
    # few members: a patch one of them adds is in the mask (1/4 > tau_m), so the masks are a bit loose
    assert iou(voted[0].mask, a) >= 0.75 and iou(voted[1].mask, b) >= 0.75


def test_the_cluster_mask_is_what_more_than_tau_m_of_members_cover():
    base = box_mask(GRID, (5, 5, 10, 10))
    bigger = box_mask(GRID, (5, 5, 10, 11))  # one more column, in 1 of 5 members (20%: not more)
    voted = votecut([base] * 4 + [bigger], GRID, **VOTE)
    assert np.array_equal(voted[0].mask, base)
    voted = votecut([base] * 3 + [bigger] * 2, GRID, **VOTE)  # 40% > 20%: the column is in
    assert np.array_equal(voted[0].mask, bigger)


def test_candidates_of_other_grids_are_resized():
    obj = box_mask(GRID, (4, 4, 12, 12))
    coarse = obj[::2, ::2]  # the same object on a 10x12 grid
    voted = votecut([obj, obj, coarse.copy(), coarse.copy()], GRID, **VOTE)
    assert voted[0].votes == 4 and iou(voted[0].mask, obj) >= 0.9


def test_pivot_moves_to_the_centre_of_its_cluster():
    # 0 agrees with 1 only; 1 agrees with everyone: starting from 1 (most agreed-with) gathers all
    iou = np.array([[1.0, 0.7, 0.1], [0.7, 1.0, 0.7], [0.1, 0.7, 1.0]])
    assert iou_clusters(iou, 0.6, 5) == [(1, [0, 1, 2])]
    # without agreement every candidate is its own cluster
    assert iou_clusters(np.eye(3), 0.6, 5) == [(0, [0]), (1, [1]), (2, [2])]


def test_eigenvector_candidates():
    v = np.zeros(GRID)
    v[4:12, 5:14] = 1.0  # an object
    v[15:17, 1:3] = 1.0  # too small: under 5 patches both ways
    v[:, :] += 0.01 * np.random.default_rng(2).standard_normal(GRID)
    candidates = eigenvector_candidates(torch.from_numpy(v.reshape(1, -1)), GRID, (2, 3), 5, 30)
    assert candidates and all(not (m[0, 0] and m[-1, -1]) for m in candidates)  # background dropped
    assert max(iou(m, box_mask(GRID, (4, 5, 12, 14))) for m in candidates) == 1.0
    assert not any(m[15:17, 1:3].all() and m.sum() == 4 for m in candidates)


def test_votecut_on_several_sources_finds_the_planted_objects():
    """Sources: two key treatments x two graph thresholds of one scene, first two eigenvectors each."""
    boxes = [(3, 2, 11, 9), (8, 13, 17, 21)]
    scene = biased_scene(GRID, boxes, noise=0.5, shared=-0.2, seed=3)
    candidates = []
    for keys in (treat_keys(scene.keys, "centered"), treat_keys(scene.keys, "no_bias", scene.bias)):
        unit = torch.nn.functional.normalize(keys, dim=1)
        for tau in (0.0, 0.15):
            spectrum = smallest_eigenvectors(binary_affinity(unit, tau, 1e-5), 2, "fast")
            candidates += eigenvector_candidates(spectrum.vectors, GRID, (2, 3), 5, 30)
    voted = votecut(candidates, GRID, **VOTE)
    for t in scene.truth:
        assert max(iou(v.mask, t) for v in voted) >= 0.8
    assert voted[0].score == 1.0 and all(0 < v.score <= 1 for v in voted)
    assert all(v.votes >= 2 for v in voted)


def test_many_candidates():
    """Hundreds of candidates (six backbones x eigenvectors x K at CuVLER's scale)."""
    rng = np.random.default_rng(4)
    objects = [box_mask(GRID, b) for b in [(1, 1, 6, 7), (8, 2, 15, 9), (3, 12, 10, 22), (12, 14, 19, 23)]]
    candidates = [jitter(objects[i % 4], rng) for i in range(400)]
    candidates += [box_mask(GRID, tuple(rng.integers(0, 8, 2)) + (12, 12)) for _ in range(40)]  # noise
    voted = votecut(candidates, GRID, **VOTE)
    assert [v.votes >= 90 for v in voted[:4]] == [True] * 4 and all(v.votes < 90 for v in voted[4:])
    for obj in objects:
        assert max(iou(v.mask, obj) for v in voted) >= 0.9


def test_a_min_votes_no_object_can_reach_is_an_error_naming_it():
    one_source = 'method.sources.dinov2=[{"keys":"centered","tau":0.1}]'  # 1 source x 1 eigenvector x 2 ks
    with pytest.raises(ConfigError, match="'method.min_votes': 3 votes can never be reached"):
        load_config("demo", "votecut", [one_source])
    assert load_config("demo", "votecut", [one_source, "method.min_votes=2"]).method.min_votes == 2
    assert load_config("demo", "votecut", [one_source, "method.iou_threshold=0.4"])  # then splits overlap
