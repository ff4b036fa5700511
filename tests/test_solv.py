"""SOLV (stages/video/solv.py, stages/video/solv_train.py): model, token drop, slot merging, training
schedule and resume, tracks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from stages.video.slot_attention import coordinate_grid, slot_position_scale
from stages.video.solv import (
    SOLV,
    SOLVConfig,
    VideoSlots,
    drop_tokens,
    frame_labels,
    load_model,
    match_tracks,
    merge_labels,
    merge_slots,
    reconstruction_loss,
    video_slots,
    video_tracks,
    windows,
)
from stages.video.solv_train import (
    FeatureBatch,
    SOLVTrainConfig,
    SOLVTrainer,
    lr_factor,
    merge_probability,
    train_solv,
)
from tests.synthetic import moving_boxes, paint_features

pytestmark = pytest.mark.usefixtures("one_thread")

# The paper's model (YTVIS19, supplementary B.2-B.3) and a tiny one for quick tests.
PAPER = SOLVConfig(
    num_slots=8,
    slot_dim=128,
    slot_iters=3,
    context=2,
    temporal_layers=3,
    temporal_heads=8,
    temporal_dropout=0.1,
    decoder_hidden=1024,
    decoder_layers=5,
    scale_factor=5.0,
    token_drop=0.5,
    merge_slots=True,
    merge_threshold=0.12,
    merge_min_slots=3,
)
TINY = dataclasses.replace(
    PAPER, num_slots=4, slot_dim=32, context=1, temporal_layers=1, temporal_heads=4, decoder_hidden=32,
    decoder_layers=3, merge_min_slots=1,
)  # fmt: skip
TRAIN = SOLVTrainConfig(
    steps=300_000,
    lr=4e-4,
    warmup_fraction=0.05,
    final_lr_fraction=0.125,
    weight_decay=0.0,
    grad_clip=1.0,
    merge_periods=180,
    seed=0,
)


def tiny_model(cfg: SOLVConfig = TINY, dim: int = 16, grid=(6, 8), seed: int = 0) -> SOLV:
    torch.manual_seed(seed)
    return SOLV(cfg, dim, grid)


def random_batch(cfg: SOLVConfig, batch: int, n: int, dim: int, seed: int) -> FeatureBatch:
    gen = torch.Generator().manual_seed(seed)
    valid = torch.ones(batch, cfg.window, dtype=torch.bool)
    valid[0, 0] = False  # a clip at the start of its video
    return FeatureBatch(torch.randn(batch, cfg.window, n, dim, generator=gen), valid)


# ----------------------------------------------------------------------------------------------------------
# Config and model


@pytest.mark.parametrize(
    "change, key",
    [
        ({"num_slots": 0}, "num_slots"),
        ({"token_drop": 1.0}, "token_drop"),
        ({"merge_threshold": -0.1}, "merge_threshold"),
        ({"slot_dim": 30}, "slot_dim"),
        ({"context": -1}, "context"),
        ({"decoder_layers": 1}, "decoder_layers"),
    ],
)
def test_bad_model_settings_name_the_key(change, key):
    with pytest.raises(ValueError, match=key):
        dataclasses.replace(PAPER, **change)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"steps": 0}, "steps"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
        ({"merge_periods": 0}, "merge_periods"),
    ],
)
def test_bad_training_settings_name_the_key(change, key):
    with pytest.raises(ValueError, match=key):
        dataclasses.replace(TRAIN, **change)


def test_forward_at_the_papers_size():
    """ViT-B/14 features (768) on the paper's YTVIS19 grid (336x504 -> 24x36), 5 frames, 8 slots, half
    the tokens dropped: shapes, masks, a finite loss and gradients everywhere."""
    torch.manual_seed(0)
    grid, dim = (24, 36), 768
    model = SOLV(PAPER, dim, grid)
    features = torch.randn(1, 5, 864, dim)
    kept, index = drop_tokens(features, PAPER.token_drop, torch.Generator().manual_seed(0))
    assert kept.shape == (1, 5, 432, dim)
    out = model(kept, torch.ones(1, 5, dtype=torch.bool), index)
    assert out.reconstruction.shape == (1, 864, dim)
    assert out.masks.shape == (1, 8, 864) and out.slots.shape == (1, 8, 128)
    k = int(out.num_slots[0])
    assert 3 <= k <= 8
    torch.testing.assert_close(out.masks[0, :k].sum(0), torch.ones(864))
    assert not out.masks[0, k:].any()
    loss = reconstruction_loss(out, features[:, 2])
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_padding_frames_do_not_change_the_output():
    model = tiny_model().eval()
    batch = random_batch(TINY, 2, 48, 16, seed=1)
    out = model(batch.features, batch.frame_valid)
    changed = batch.features.clone()
    noise = torch.randn(48, 16)
    changed[0, 0] += noise  # the padding frame of clip 0
    again = model(changed, batch.frame_valid)
    torch.testing.assert_close(again.reconstruction, out.reconstruction)
    changed[1, 0] += noise  # a real frame of clip 1: it is attended to
    assert not torch.allclose(model(changed, batch.frame_valid).reconstruction[1], out.reconstruction[1])


def test_windows_are_clamped_and_flag_frames_outside_the_video():
    index, valid = windows(4, [0, 3], 2)
    assert index.tolist() == [[0, 0, 0, 1, 2], [1, 2, 3, 3, 3]]
    assert valid.tolist() == [[False, False, True, True, True], [True, True, True, False, False]]


def test_invalid_middle_frame_and_wrong_window_are_errors():
    model = tiny_model()
    batch = random_batch(TINY, 1, 48, 16, seed=0)
    with pytest.raises(ValueError, match="middle"):
        model(batch.features, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected"):
        model(batch.features[:, :2], batch.frame_valid[:, :2])


# ----------------------------------------------------------------------------------------------------------
# Token drop


def test_token_drop_keeps_half_of_each_frame_and_changes_which():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 5, 864, 8)
    kept, index = drop_tokens(features, 0.5, gen)
    assert index.shape == (3, 5, 432) and kept.shape == (3, 5, 432, 8)
    assert (index.diff(dim=-1) > 0).all()  # increasing: distinct patches in raster order
    assert torch.equal(kept, features.gather(2, index[..., None].expand(-1, -1, -1, 8)))
    frames = {tuple(i.tolist()) for i in index.reshape(15, 432)}
    assert len(frames) == 15  # every frame of every clip drops its own patches
    _, again = drop_tokens(features, 0.5, gen)
    assert not torch.equal(again, index)  # and anew at every draw


def test_dropped_patches_are_not_seen():
    model = tiny_model().eval()
    batch = random_batch(TINY, 2, 48, 16, seed=2)
    kept, index = drop_tokens(batch.features, 0.5, torch.Generator().manual_seed(3))
    out = model(kept, batch.frame_valid, index)
    dropped = torch.ones(2, 3, 48, dtype=torch.bool).scatter(2, index, False)
    changed = torch.where(dropped[..., None], torch.randn_like(batch.features), batch.features)
    kept2, index2 = drop_tokens(changed, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(index2, index)
    torch.testing.assert_close(model(kept2, batch.frame_valid, index2).reconstruction, out.reconstruction)
    kept2[1, 1, 0] += torch.randn(16)  # a kept patch of clip 1's middle frame
    assert not torch.allclose(
        model(kept2, batch.frame_valid, index2).reconstruction[1], out.reconstruction[1]
    )


def test_training_with_token_drop_keeps_the_loss_finite():
    trainer = SOLVTrainer(tiny_model(), dataclasses.replace(TRAIN, steps=8, merge_periods=2))
    scalars = [trainer.train_step(random_batch(TINY, 4, 48, 16, seed=s)) for s in range(8)]
    assert all(math.isfinite(s["loss"]) for s in scalars)
    assert all(1 <= s["num_slots"] <= TINY.num_slots for s in scalars)
    assert {s["merge_probability"] for s in scalars} == {0.0, 1.0}


# ----------------------------------------------------------------------------------------------------------
# Slot merging


def _slots_at_cosine_distances(distances: list[float], dim: int = 16) -> np.ndarray:
    """Slot 0 = e0; slot j = a unit vector at cosine distance distances[j-1] from e0, each turned
    towards its own axis (so the others are far apart)."""
    slots = [np.eye(dim)[0]]
    for j, d in enumerate(distances, 1):
        cos = 1 - d
        slots.append(cos * np.eye(dim)[0] + math.sqrt(1 - cos**2) * np.eye(dim)[j])
    return np.stack(slots)


def test_merge_threshold_is_a_strict_cosine_distance():
    far = [1.0, 1.0]  # two slots orthogonal to slot 0 and to each other
    assert merge_labels(_slots_at_cosine_distances([0.11, *far]), 0.12, 1).tolist() == [0, 0, 1, 2]
    assert merge_labels(_slots_at_cosine_distances([0.13, *far]), 0.12, 1).tolist() == [0, 1, 2, 3]


def test_complete_linkage_needs_every_pair_close():
    # 1 and 2 are each 0.1 from slot 0 but 0.2+ from each other: complete linkage keeps one of them apart
    slots = _slots_at_cosine_distances([0.1, 0.1, 1.0])
    labels = merge_labels(slots, 0.12, 1)
    assert labels[1] != labels[2] and len(set(labels.tolist())) == 3


def test_merge_that_leaves_too_few_slots_is_not_applied():
    slots = _slots_at_cosine_distances([0.05, 1.0])
    assert merge_labels(slots, 0.12, 2).tolist() == [0, 0, 1]
    assert merge_labels(slots, 0.12, 3).tolist() == [0, 1, 2]


def test_merging_joins_two_slots_that_cover_one_object():
    """Slots 0 and 2 each cover half of one object (and are nearly parallel); slots 1 and 3 cover the
    rest of the frame. After merging: 3 slots, the merged one is their mean, its attention covers the
    whole object, and its position and scale are the object's."""
    grid = (6, 8)
    coords = coordinate_grid(grid)
    obj = torch.zeros(grid, dtype=torch.bool)
    obj[1:5, 2:6] = True
    left, right = obj.clone(), obj.clone()
    left[:, 4:] = False
    right[:, :4] = False
    rest = ~obj
    top = rest.clone()
    top[3:] = False
    attn = torch.stack([left, rest & ~top, right, top]).float().reshape(1, 4, -1)
    slots = torch.from_numpy(_slots_at_cosine_distances([0.9, 0.02, 0.95])).float()[None]
    labels = torch.from_numpy(merge_labels(slots[0].numpy(), 0.12, 3))[None]
    assert labels.tolist() == [[0, 1, 0, 2]]
    merged, merged_attn, valid = merge_slots(slots, attn, labels)
    assert valid.tolist() == [[True, True, True, False]]
    torch.testing.assert_close(merged[0, 0], (slots[0, 0] + slots[0, 2]) / 2)
    assert torch.equal(merged_attn[0, 0].bool(), obj.reshape(-1))
    assert not merged_attn[0, 3].any() and not merged[0, 3].any()
    position, scale = slot_position_scale(merged_attn[:, :1], coords)
    inside = coords[obj.reshape(-1)]
    torch.testing.assert_close(position[0, 0], inside.mean(0))
    torch.testing.assert_close(scale[0, 0], inside.std(0, unbiased=False))


def test_model_merges_parallel_slots_and_decodes_only_the_merged_ones():
    model = tiny_model().eval()
    batch = random_batch(TINY, 2, 48, 16, seed=4)
    bound = model.temporal.forward

    def parallel_slots(slots, valid):  # make slot 2 a copy of slot 0 (scaled), in clip 0 only
        out = bound(slots, valid).clone()
        out[0, 2] = 1.5 * out[0, 0]
        return out

    model.temporal.forward = parallel_slots
    out = model(batch.features, batch.frame_valid, merge=torch.tensor([True, False]))
    assert out.num_slots.tolist()[1] == 4  # not merged
    k = int(out.num_slots[0])
    assert k <= 3 and not out.masks[0, k:].any()
    torch.testing.assert_close(out.masks[0].sum(0), torch.ones(48))


# ----------------------------------------------------------------------------------------------------------
# Schedule, checkpoints, resume


def test_learning_rate_warms_up_then_decays_exponentially():
    cfg = dataclasses.replace(TRAIN, steps=1000)
    factors = np.array([lr_factor(s, cfg) for s in range(1000)])
    assert factors[0] == pytest.approx(1 / 50) and factors[49] == pytest.approx(1.0)  # 5% warm-up, linear
    np.testing.assert_allclose(np.diff(factors[:50]), 1 / 50)
    assert factors[-1] == pytest.approx(0.125)
    ratios = factors[51:] / factors[50:-1]  # a constant ratio: exponential
    np.testing.assert_allclose(ratios, ratios[0])
    assert lr_factor(5000, cfg) == pytest.approx(0.125)  # past the end it stays at the floor


def test_merge_probability_grows_logarithmically_over_the_periods():
    cfg = dataclasses.replace(TRAIN, steps=1800, merge_periods=180)
    assert merge_probability(0, cfg) == 0.0
    assert merge_probability(10, cfg) == pytest.approx(math.log(2) / math.log(180))
    assert merge_probability(1799, cfg) == pytest.approx(1.0)
    probs = [merge_probability(s, cfg) for s in range(0, 1800, 10)]
    assert probs == sorted(probs)
    assert merge_probability(0, dataclasses.replace(cfg, merge_periods=1)) == 1.0


def _batches(start: int, stop: int):
    for step in range(start, stop):
        yield random_batch(TINY, 3, 48, 16, seed=100 + step)


def test_resumed_training_ends_bit_for_bit_where_a_straight_run_does(tmp_path):
    """8 steps straight vs 4 steps, a checkpoint, a new process-like start (a fresh model and other
    global random draws in between) and 4 more: identical parameters, optimizer state and scalars.
    Token drop, merge draws and dropout all take part (merging from step 2 of 8)."""
    cfg = dataclasses.replace(TRAIN, steps=8, merge_periods=4)
    straight_scalars = []
    torch.manual_seed(11)
    straight = train_solv(tiny_model(), _batches(0, 8), cfg, on_step=lambda s, d: straight_scalars.append(d))

    ckpt = tmp_path / "solv.pth"
    resumed_scalars = []
    torch.manual_seed(11)
    first = train_solv(
        tiny_model(), _batches(0, 4), cfg, ckpt, on_step=lambda s, d: resumed_scalars.append(d)
    )
    assert first.step == 4 and ckpt.is_file()
    torch.manual_seed(999)  # the global generator moves on in between; the checkpoint restores it
    torch.randn(100)
    second = train_solv(
        tiny_model(seed=5), _batches(4, 8), cfg, ckpt, on_step=lambda s, d: resumed_scalars.append(d)
    )
    assert second.step == 8
    assert resumed_scalars == straight_scalars
    for (name, a), (_, b) in zip(
        straight.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    a, b = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    assert straight.scheduler.get_last_lr() == second.scheduler.get_last_lr()
    # a finished run is not trained further
    assert train_solv(tiny_model(), _batches(8, 12), cfg, ckpt).step == 8


def test_checkpoint_of_another_model_is_refused(tmp_path):
    ckpt = tmp_path / "solv.pth"
    train_solv(tiny_model(), _batches(0, 1), dataclasses.replace(TRAIN, steps=2), ckpt)
    other = tiny_model(dataclasses.replace(TINY, num_slots=5))
    with pytest.raises(ValueError, match="num_slots"):
        train_solv(other, _batches(1, 2), dataclasses.replace(TRAIN, steps=2), ckpt)


def test_checkpoint_loads_for_inference(tmp_path):
    ckpt = tmp_path / "solv.pth"
    trainer = train_solv(tiny_model(), _batches(0, 2), dataclasses.replace(TRAIN, steps=2), ckpt)
    loaded = load_model(ckpt)
    features = torch.randn(5, 48, 16)
    a, b = video_slots(trainer.model, features, 2), video_slots(loaded, features, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------------------------------------
# Tracks


def test_matching_follows_permuted_slots():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 16, generator=gen)
    frames = [base, base[[3, 1, 4, 0, 2]] + 0.01, base[[2, 0, 1, 4, 3]]]
    ids = match_tracks(frames)
    assert ids[0].tolist() == [0, 1, 2, 3, 4]
    assert ids[1].tolist() == [3, 1, 4, 0, 2] and ids[2].tolist() == [2, 0, 1, 4, 3]


def test_leftover_slots_join_their_most_similar_track_and_lost_tracks_end():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, 16, generator=gen)
    split = torch.stack([base[0], base[1], base[2], base[1] + 0.2 * torch.randn(16, generator=gen)])
    ids = match_tracks([base, split, base[:2]])
    assert ids[1].tolist() == [0, 1, 2, 1]
    assert ids[2].tolist() == [0, 1]


def test_frame_labels_upsample_bilinearly_then_take_the_largest_mask():
    masks = torch.zeros(1, 2, 4)
    masks[0, 0] = torch.tensor([1.0, 0.8, 0.3, 0.0])  # a 2x2 grid
    masks[0, 1] = 1 - masks[0, 0]
    assert frame_labels(masks, (2, 2), None).tolist() == [[[0, 0], [1, 1]]]
    up = frame_labels(masks, (2, 2), (8, 8))
    assert up.shape == (1, 8, 8) and up[0, 0].tolist() == [0] * 8 and up[0, -1].tolist() == [1] * 8


def test_tracks_of_a_long_video_with_varying_slot_counts():
    """500 frames, 8 slots merged to 3..8 per frame at random: every frame gets labels, ids are
    1..M with M <= 8 (tracks come only from frame 0's slots), background 0 only with a background rule."""
    gen = torch.Generator().manual_seed(0)
    t, k, grid = 500, 8, (6, 8)
    counts = torch.randint(3, k + 1, (t,), generator=gen)
    slots = torch.randn(t, k, 16, generator=gen)
    logits = torch.randn(t, k, 48, generator=gen).masked_fill(
        torch.arange(k)[None, :, None] >= counts[:, None, None], float("-inf")
    )
    video = VideoSlots(slots, logits.softmax(dim=1), counts)
    for rule in ("border", "largest"):
        tracks = video_tracks(video, grid, background=rule)
        assert tracks.shape == (t, 6, 8) and int(tracks.min()) == 0
        assert set(tracks.unique().tolist()) == set(range(int(tracks.max()) + 1))
    none = video_tracks(video, grid, size=(12, 16), background="none")
    assert none.shape == (t, 12, 16) and int(none.min()) == 1 and int(none.max()) <= counts[0]


def test_output_tracks_follow_moving_objects(planted_solv):
    """The session's SOLV (trained on still feature maps of planted boxes, n = 0 so that training stays
    fast; windows of n > 0 are tested above) on a new 12-frame video of two 3x3 boxes moving over the
    background: each box is one track in every frame (the track holding most of its patches is the same
    in all frames and covers it with IoU >= 0.8), and the background is track 0.
    """
    model, palette = planted_solv
    gen = torch.Generator().manual_seed(123)
    labels = moving_boxes(12, model.grid, 2, 3, gen)
    features = paint_features(labels, palette[[0, 3, 1]], 0.1, gen)
    video = video_slots(model, features, 4)
    # each frame lists its slots in another order (as merging renumbers them): identity must come from
    # the matching, not from the slot index
    order = torch.stack([torch.randperm(3, generator=gen) for _ in range(12)])
    shuffled = VideoSlots(
        video.slots.gather(1, order[..., None].expand_as(video.slots)),
        video.masks.gather(1, order[..., None].expand_as(video.masks)),
        video.num_slots,
    )
    tracks = video_tracks(shuffled, model.grid, background="border")
    for obj in (1, 2):
        inside = labels == obj
        per_frame = [torch.mode(tracks[t][inside[t]]).values.item() for t in range(12)]
        assert len(set(per_frame)) == 1 and per_frame[0] != 0, per_frame
        track = tracks == per_frame[0]
        iou = (track & inside).sum() / (track | inside).sum()
        assert iou >= 0.8, f"object {obj}: IoU {float(iou):.2f} with its track"
    assert (tracks[labels == 0] == 0).float().mean() >= 0.9
