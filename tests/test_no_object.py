"""The no-object rule: nothing on blank and noise scenes, from every method; planted objects still found."""

import numpy as np
import pytest
import torch

from stages.discovery.deep_spectral import deep_spectral
from stages.discovery.found import found
from stages.discovery.freemask import freemask
from stages.discovery.lost import lost
from stages.discovery.maskcut import maskcut
from stages.discovery.ncut import treat_keys
from stages.discovery.no_object import NoObjectRule, mean_pairwise_cosine, valid_patches
from stages.discovery.tokencut import tokencut
from stages.discovery.votecut import votecut
from tests.scenes import biased_scene, cls_attention, iou, scene_image

GRID = (18, 24)
MAX_COSINE = 0.8  # method.no_object in configs/methods/{found,deep_spectral,freemask,votecut}.yaml
EMPTY = {"blank": dict(noise=0.05, field=0.25), "noise": dict(noise=0.35, field=0.1)}


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def rule_for(scene, valid=None, max_cosine=MAX_COSINE):
    return NoObjectRule.for_image(scene.keys, scene.bias, scene.grid, max_cosine, valid)


def all_methods(scene, rule):
    """Every method's masks on the scene (the settings each would use on DINOv2-like keys)."""
    centered = treat_keys(scene.keys, "centered")
    no_bias = treat_keys(scene.keys, "no_bias", scene.bias)
    attention = cls_attention(scene.union, seed=1)
    image = scene_image(scene.grid, 8, scene.truth)
    spectral = deep_spectral(no_bias, scene.grid, image, 8, 10.0, 8, 2, 3, "fast", 0, rule)
    return {
        "tokencut": [m for m in [tokencut(scene.keys, scene.grid, 0.2, 1e-5, True, "fast", rule)] if m.any()],
        "maskcut": maskcut(scene.keys, scene.grid, 0.2, 1e-5, True, 3, 0.5, 0.01, "fast", rule),
        "lost": [m for m in [lost(no_bias, scene.grid, 100, rule)] if m.any()],
        "found": [m for m in [found(no_bias, attention, scene.grid, 0.3, True, rule)] if m.any()],
        "deep_spectral": [spectral.object] if spectral.object.any() else [],
        "freemask": [
            m.mask
            for m in freemask(centered, scene.grid, (1.0, 0.5), 0.5, 2.0, 20, 0.7, 0.2, 0.95, 500, rule)
        ],
        "votecut": [v.mask for v in votecut(_candidates(scene), scene.grid, 0.6, 5, 0.2, 10, 2, rule)],
    }


def _candidates(scene):
    """VoteCut candidates: the first masks of MaskCut and TokenCut on two key treatments (4 sources)."""
    out = []
    for keys in (treat_keys(scene.keys, "centered"), treat_keys(scene.keys, "no_bias", scene.bias)):
        out += maskcut(keys, scene.grid, 0.2, 1e-5, False, 1, 0.5, 0.01, "fast")
        out.append(tokencut(keys, scene.grid, 0.2, 1e-5, False, "fast"))
    return out


@pytest.mark.parametrize("kind", sorted(EMPTY))
def test_empty_scenes_get_masks_without_the_rule_and_none_with_it(kind):
    scene = biased_scene(GRID, [], **EMPTY[kind], seed=3)
    without = all_methods(scene, None)
    # The problem: centred keys make a blank or noise scene look structured, and the cuts find "objects".
    assert without["maskcut"] and without["tokencut"]
    with_rule = all_methods(scene, rule_for(scene))
    assert {name: len(masks) for name, masks in with_rule.items()} == {name: 0 for name in with_rule}


def test_planted_objects_are_still_found_with_the_rule():
    # Objects a little anti-correlated with the background (LOST needs fewer positive links on them).
    scene = biased_scene(GRID, [(4, 3, 12, 10), (6, 14, 15, 21)], noise=0.35, field=0.1, shared=-0.2, seed=4)
    rule = rule_for(scene)
    for name, masks in all_methods(scene, rule).items():
        assert masks, name
        best = max(max(iou(m, t) for t in scene.truth) for m in masks)
        union = max(iou(m, scene.union) for m in masks)
        assert max(best, union) >= 0.7, name  # FOUND's and DSM's foreground may hold both objects
        assert all(rule.separates(m) for m in masks)


def test_the_measure_and_its_threshold():
    scene = biased_scene(GRID, [(4, 3, 12, 10)], noise=0.2, field=0.1, seed=5)
    obj = scene.truth[0]
    # Object vs background: their bias-free mean keys share only what the object shares with it (~0.4).
    assert rule_for(scene).similarity(obj) < 0.6
    # An arbitrary half of the background: both sides are background, nearly parallel.
    half = np.zeros(GRID, bool)
    half[12:, :] = True
    assert rule_for(scene).similarity(half) > 0.95
    assert rule_for(scene).separates(obj) and not rule_for(scene).separates(half)
    # The threshold is the only decision: a rule demanding more dissimilarity than the object has drops it.
    assert not rule_for(scene, max_cosine=0.2).separates(obj)
    # Without removing the bias the two sides look alike: the bias is what makes the measure work.
    raw = NoObjectRule.for_image(scene.keys, torch.zeros(scene.keys.shape[1]), GRID, MAX_COSINE)
    assert raw.similarity(obj) > 0.9


def test_whole_frame_and_padding_masks():
    blank = biased_scene(GRID, [], noise=0.05, seed=6)
    full = np.ones(GRID, bool)
    # A mask covering the image has no outside: it is an object only if the image's keys are not all alike.
    assert not rule_for(blank).separates(full)
    busy = biased_scene(GRID, [(0, 0, 9, 12), (9, 12, 18, 24), (0, 12, 9, 24)], noise=0.2, seed=6)
    assert (
        mean_pairwise_cosine(busy.keys - busy.bias)
        < MAX_COSINE
        < mean_pairwise_cosine(blank.keys - blank.bias)
    )
    assert rule_for(busy).separates(full)
    # A mask made only of padding patches (centres outside the image) is never an object.
    valid = valid_patches(GRID, 14, 17 * 14 + 3, 24 * 14)  # the last row is mostly padding
    assert valid[:17].all() and not valid[17].any()
    strip = np.zeros(GRID, bool)
    strip[17] = True
    scene = biased_scene(GRID, [(17, 0, 18, 24)], noise=0.1, seed=7)  # the strip really differs ...
    assert rule_for(scene).separates(strip)
    assert not rule_for(scene, valid).separates(strip)  # ... but it is padding
    assert not rule_for(scene).separates(np.zeros(GRID, bool))


def test_rule_errors():
    scene = biased_scene(GRID, [], seed=8)
    with pytest.raises(ValueError, match="disagree"):
        NoObjectRule.for_image(scene.keys, scene.bias[:-1], GRID, MAX_COSINE)
    with pytest.raises(ValueError, match="max_cosine"):
        NoObjectRule.for_image(scene.keys, scene.bias, GRID, 1.5)
    with pytest.raises(ValueError, match="valid patches"):
        NoObjectRule.for_image(scene.keys, scene.bias, GRID, MAX_COSINE, np.zeros(GRID, bool))
