"""BA temporal correlator (stages/video/correlator.py): model, sparse-key attention, losses, training,
checkpoints and clip augmentation, on tokens the tests make (tiny dims: C = 48, 3 frames of 4 x 6 patches)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from stages.video.ba_cluster import symmetric_kl
from stages.video.correlator import (
    LossParams,
    TemporalCorrelator,
    apply_crop,
    clip_augment,
    correlator_loss,
    dino_sparse_attention,
    dropout_mask,
    effective_sample_size,
    entropy_weights,
    iter_attention_chunks,
    load_checkpoint,
    make_optimizer,
    motion_margin_loss,
    patch_attention,
    sample_crop,
    sample_pos_neg,
    save_checkpoint,
    semantic_margin_loss,
    split_heads,
    train_correlator,
)

DIM, HEADS, FRAMES, GRID = 48, 8, 3, (4, 6)
N_PATCH = GRID[0] * GRID[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int, heads: int = HEADS, std: float = 0.3) -> TemporalCorrelator:
    """A correlator with larger random weights than the training init, so that attention is peaked and
    every term of the computation matters."""
    torch.manual_seed(seed)
    model = TemporalCorrelator(DIM, heads, 4.0, FRAMES)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def make_tokens(seed: int, batch: int, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 1 + N_PATCH, DIM, generator=g)


def reference_head_attention(model: TemporalCorrelator, tokens: torch.Tensor) -> torch.Tensor:
    """Per-head patch attention written out plainly: (B, T, 1+n, C) -> (B, heads, T*n, T*n), softmax over
    the patch keys only, from the patch tokens alone."""
    b, t, per_frame, c = tokens.shape
    d = c // model.num_heads
    x = (tokens + model.temporal[:t, None, :])[:, :, 1:].reshape(b, t * (per_frame - 1), c)
    h = model.norm1(x)
    q = model.q(h).reshape(b, -1, model.num_heads, d).permute(0, 2, 1, 3)
    k = model.k(h).reshape(b, -1, model.num_heads, d).permute(0, 2, 1, 3)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Model


def test_parameter_count_at_dim_384():
    model = TemporalCorrelator(384, 8, 4.0, 3)
    c = 384
    # q, k, v (no bias), output projection, MLP C -> 4C -> C, two LayerNorms
    block = 3 * c * c + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c) + 2 * (2 * c)
    assert block == 12 * c * c + 10 * c == 1_773_312
    total = sum(p.numel() for p in model.parameters())
    assert total == block + 3 * c == 1_774_464
    assert 1.6e6 <= total <= 1.8e6
    assert model.temporal.shape == (3, c)


def test_attention_rows_are_patch_distributions():
    model = make_model(0)
    tokens = make_tokens(1, batch=2, frames=FRAMES)
    with torch.no_grad():
        fused, attn = model(tokens, with_attention=True)
        expected = reference_head_attention(model, tokens).mean(dim=1)
    n_all = FRAMES * N_PATCH
    assert fused.shape == tokens.shape
    assert attn.shape == (2, n_all, n_all)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, n_all), atol=1e-5, rtol=0)
    torch.testing.assert_close(attn, expected, atol=1e-6, rtol=1e-5)
    # CLS is excluded: new CLS inputs change the fused tokens (CLS is a key/value of the block) but not A_v
    other = tokens.clone()
    other[:, :, 0] = torch.randn(2, FRAMES, DIM)
    with torch.no_grad():
        fused2, attn2 = model(other, with_attention=True)
    torch.testing.assert_close(attn2, attn, atol=1e-6, rtol=0)
    assert (fused2[:, :, 1:] - fused[:, :, 1:]).abs().max() > 1e-3
    assert model(tokens, with_attention=False)[1] is None
    with pytest.raises(ValueError, match="temporal embedding"):
        model(make_tokens(2, batch=1, frames=FRAMES + 1), with_attention=False)


def test_the_losses_read_the_attention_after_the_same_dropout_that_mixes_the_values():
    model = make_model(30)
    model.attn_drop = 0.4
    tokens = make_tokens(31, batch=2, frames=FRAMES)
    model.train()
    with torch.no_grad():
        fused, attn = model(tokens, with_attention=True, generator=torch.Generator().manual_seed(5))
        # the same computation by hand, with the mask drawn from the same generator state
        b, t, per_frame, c = tokens.shape
        x = (tokens + model.temporal[:t, None, :]).reshape(b, t * per_frame, c)
        q, k, v = (split_heads(layer(model.norm1(x)), HEADS) for layer in (model.q, model.k, model.v))
        logits = (q * model.scale) @ k.transpose(-2, -1)
        keep = dropout_mask(logits.shape, 0.4, torch.Generator().manual_seed(5), "cpu")
        probs = logits.softmax(-1) * keep / 0.6
        mixed = x + model.proj((probs @ v).transpose(1, 2).reshape(b, t * per_frame, c))
        expected = mixed + model.fc2(torch.nn.functional.gelu(model.fc1(model.norm2(mixed))))
    assert 0.5 < keep.float().mean() < 0.7
    torch.testing.assert_close(attn, patch_attention(logits, t, keep, 0.4), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused, expected.reshape(fused.shape), atol=1e-5, rtol=1e-5)
    # a dropped (query, key) pair is zero in the attention the losses read, in every head that dropped it
    patch_keep = keep.reshape(b, HEADS, t, per_frame, t, per_frame)[:, :, :, 1:, :, 1:]
    all_dropped = ~patch_keep.reshape(b, HEADS, t * (per_frame - 1), -1).any(dim=1)
    assert all_dropped.any() and (attn[all_dropped] == 0).all()
    # rows no longer sum to 1 exactly while training, but do on average
    assert (attn.sum(-1) - 1).abs().max() > 1e-3 and abs(attn.sum(-1).mean().item() - 1) < 0.05


def test_dropout_acts_only_in_training_and_from_the_generator():
    model = make_model(32)
    plain = make_model(32)
    model.attn_drop, model.proj_drop = 0.4, 0.1
    tokens = make_tokens(33, batch=1, frames=FRAMES)
    with torch.no_grad():
        eval_out = model(tokens, with_attention=True)
        reference = plain(tokens, with_attention=True)
        assert all(torch.equal(a, b) for a, b in zip(eval_out, reference, strict=True))  # eval: no dropout
        model.train()
        first = model(tokens, True, torch.Generator().manual_seed(1))
        again = model(tokens, True, torch.Generator().manual_seed(1))
        other = model(tokens, True, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1]) and not torch.equal(first[0], other[0])
    assert not torch.equal(first[1], reference[1])
    with pytest.raises(ValueError, match="attn_drop"):
        TemporalCorrelator(DIM, HEADS, 4.0, FRAMES, attn_drop=1.0)


def test_temporal_embedding_is_used():
    model = make_model(3)
    tokens = make_tokens(4, batch=1, frames=FRAMES)
    with torch.no_grad():
        _, attn = model(tokens, with_attention=True)
        model.temporal.zero_()
        _, flat = model(tokens, with_attention=True)
    assert (attn - flat).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Sparse-key inference


def test_sparse_keys_equal_renormalised_columns_of_full_attention():
    model = make_model(5)
    tokens = make_tokens(6, batch=1, frames=FRAMES)
    with torch.no_grad():
        _, full = model(tokens, with_attention=True)
        heads = reference_head_attention(model, tokens)[0]  # (heads, N, N)
    video = tokens[0]
    every = model.sparse_attention(video, 1, "absolute", range(FRAMES))
    torch.testing.assert_close(every, full[0], atol=1e-6, rtol=1e-5)
    # key frames 0 and 2: per head, the full softmax restricted to their columns and renormalised
    cols = torch.cat([torch.arange(N_PATCH), 2 * N_PATCH + torch.arange(N_PATCH)])
    part = heads[:, :, cols]
    expected = (part / part.sum(-1, keepdim=True)).mean(0)
    sparse = model.sparse_attention(video, 2, "absolute", range(FRAMES))
    assert sparse.shape == (FRAMES * N_PATCH, 2 * N_PATCH)
    torch.testing.assert_close(sparse, expected, atol=1e-6, rtol=1e-5)
    # with one head, that is the renormalised columns of the head-averaged attention itself
    single = make_model(7, heads=1)
    with torch.no_grad():
        _, full1 = single(tokens, with_attention=True)
    cut = full1[0][:, cols]
    torch.testing.assert_close(
        single.sparse_attention(video, 2, "absolute", range(FRAMES)),
        cut / cut.sum(-1, keepdim=True),
        atol=1e-6,
        rtol=1e-5,
    )


def test_sparse_attention_is_the_same_in_any_chunking():
    model = make_model(8)
    video = make_tokens(9, batch=1, frames=7)[0]
    attend = partial(model.sparse_attention, video, 3, "relative")
    whole = attend(range(7))
    assert whole.shape == (7 * N_PATCH, 3 * N_PATCH)  # key frames 0, 3, 6
    torch.testing.assert_close(whole.sum(-1), torch.ones(7 * N_PATCH), atol=1e-5, rtol=0)
    for chunk in (1, 2, 3, 7, 10):
        parts = list(iter_attention_chunks(attend, 7, chunk))
        assert [list(frames) for frames, _ in parts] == [
            list(range(s, min(7, s + chunk))) for s in range(0, 7, chunk)
        ]
        assert torch.equal(torch.cat([rows for _, rows in parts]), whole)


def test_relative_temporal_positions_for_long_videos():
    model = make_model(10)
    # M = 3: the query takes the centre embedding, keys the one for earlier / same / later frame
    assert model.embedding_positions(5, 0, 20, "relative") == (1, 0)
    assert model.embedding_positions(5, 5, 20, "relative") == (1, 1)
    assert model.embedding_positions(5, 6, 20, "relative") == (1, 2)
    assert model.embedding_positions(5, 19, 20, "relative") == (1, 2)
    assert model.embedding_positions(0, 2, 3, "absolute") == (0, 2)
    video = make_tokens(11, batch=1, frames=FRAMES)[0]
    absolute = model.sparse_attention(video, 1, "absolute", range(FRAMES))
    relative = model.sparse_attention(video, 1, "relative", range(FRAMES))
    rows = slice(N_PATCH, 2 * N_PATCH)  # the middle frame sees exactly what it saw in training
    torch.testing.assert_close(relative[rows], absolute[rows], atol=1e-6, rtol=1e-5)
    assert (relative[:N_PATCH] - absolute[:N_PATCH]).abs().max() > 1e-4
    long_video = make_tokens(12, batch=1, frames=8)[0]
    with pytest.raises(ValueError, match="absolute"):
        model.sparse_attention(long_video, 2, "absolute", range(8))
    rows_long = model.sparse_attention(long_video, 2, "relative", range(8))
    torch.testing.assert_close(rows_long.sum(-1), torch.ones(8 * N_PATCH), atol=1e-5, rtol=0)


def test_shared_temporal_embedding_gives_each_key_frame_one_embedding():
    model = make_model(34)
    for query, key in ((5, 0), (5, 19), (0, 0), (19, 3)):
        assert model.embedding_positions(query, key, 20, "shared") == (1, 1)
    long_video = make_tokens(35, batch=1, frames=8)[0]
    shared = model.sparse_attention(long_video, 2, "shared", range(8))
    # = the attention of a model whose every frame carries the centre embedding
    centred = make_model(34)
    with torch.no_grad():
        centred.temporal[:] = model.temporal[1]
    torch.testing.assert_close(
        shared, centred.sparse_attention(long_video, 2, "relative", range(8)), atol=1e-6, rtol=1e-5
    )
    relative = model.sparse_attention(long_video, 2, "relative", range(8))
    assert (shared - relative).abs().max() > 1e-4
    with pytest.raises(ValueError, match="shared"):
        model.embedding_positions(0, 0, 3, "other")


def test_dino_baseline_against_a_plain_loop():
    g = torch.Generator().manual_seed(13)
    frames, heads = 5, 6
    queries = torch.randn(frames, 1 + N_PATCH, DIM, generator=g)
    keys = torch.randn(frames, 1 + N_PATCH, DIM, generator=g)
    got = dino_sparse_attention(queries, keys, heads, 2, range(frames))
    d = DIM // heads
    key_patches = keys[[0, 2, 4], 1:].reshape(-1, DIM)  # key frames 0, 2, 4
    expected = torch.zeros(frames * N_PATCH, 3 * N_PATCH)
    for t in range(frames):
        for i in range(N_PATCH):
            q = queries[t, 1 + i]
            for h in range(heads):
                logits = key_patches[:, h * d : (h + 1) * d] @ q[h * d : (h + 1) * d] / math.sqrt(d)
                expected[t * N_PATCH + i] += torch.softmax(logits, 0) / heads
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    chunks = iter_attention_chunks(partial(dino_sparse_attention, queries, keys, heads, 2), frames, 2)
    assert torch.equal(torch.cat([rows for _, rows in chunks]), got)


def test_dino_baseline_matches_the_backbone_attention():
    from stages.features.backbone import Backbone

    backbone = Backbone("test_vit_tiny", None, "cpu", random_init=True, seed=0)
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(14))
    feats = backbone(images, want=("keys", "queries", "attention"))
    heads = feats.attention.shape[1]
    # one frame as its own key frame: the backbone's patch-to-patch attention, renormalised per head
    for t in range(2):
        part = feats.attention[t, :, 1:, 1:]
        expected = (part / part.sum(-1, keepdim=True)).mean(0)
        got = dino_sparse_attention(feats.queries[t : t + 1], feats.keys[t : t + 1], heads, 1, [0])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Losses


def test_sampling_positives_and_negatives_by_hand():
    # one clip, 2 frames of 4 patches; row 0 written out, the other rows are uniform
    attn = torch.full((1, 8, 8), 1 / 8)
    attn[0, 0] = torch.tensor([0.10, 0.40, 0.20, 0.30, 0.05, 0.15, 0.25, 0.35]) / 1.8
    pos, neg = sample_pos_neg(attn, 2, 1, 2)
    assert pos.shape == (1, 8, 2, 1) and neg.shape == (1, 8, 2, 2)
    assert pos[0, 0].tolist() == [[1], [7]]  # the most attended patch of each frame, global columns
    assert sorted(neg[0, 0, 0].tolist()) == [0, 2]
    assert sorted(neg[0, 0, 1].tolist()) == [4, 5]
    assert ((pos[0, 1:] >= 4) == (torch.arange(2) == 1).view(2, 1)).all()  # frame t's samples lie in t
    with pytest.raises(ValueError, match="exceeds"):
        sample_pos_neg(attn, 2, 2, 3)


def test_semantic_margin_by_hand():
    features = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-3.0, 0.0]]])
    # anchor 0: one frame, positive patch 1 (cos 1/sqrt2), negatives 2 (cos 0) and 3 (cos -1)
    pos = torch.tensor([1, 0, 0, 0]).view(1, 4, 1, 1)
    neg = torch.tensor([[2, 3], [2, 3], [1, 1], [1, 1]]).view(1, 4, 1, 2)
    loss = semantic_margin_loss(features, pos, neg, 0.8)
    c = 1 / math.sqrt(2)
    expected0 = (max(0.0, 0.8 - c + 0.0) + max(0.0, 0.8 - c - 1.0)) / 2
    assert loss.shape == (1, 4)
    assert loss[0, 0].item() == pytest.approx(expected0, abs=1e-6)
    # anchor 1: positive 0 (cos 1/sqrt2), negatives 2 (cos 1/sqrt2) and 3 (cos -1/sqrt2)
    expected1 = (max(0.0, 0.8 - c + c) + max(0.0, 0.8 - c - c)) / 2
    assert loss[0, 1].item() == pytest.approx(expected1, abs=1e-6)


def skl(p: list[float], q: list[float]) -> float:
    return sum((a - b) * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True))


def test_motion_margin_by_hand_and_anchor_detached():
    rows = [[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]]
    attn = torch.tensor([rows], dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([1, 0, 3, 2]).view(1, 4, 1, 1)
    neg = torch.tensor([[2, 3], [2, 3], [0, 1], [0, 1]]).view(1, 4, 1, 2)
    loss = motion_margin_loss(attn, pos, neg, 1.0)
    d01, d02, d03 = skl(rows[0], rows[1]), skl(rows[0], rows[2]), skl(rows[0], rows[3])
    expected0 = (max(0.0, 1.0 + d01 - d02) + max(0.0, 1.0 + d01 - d03)) / 2
    assert loss[0, 0].item() == pytest.approx(expected0, rel=1e-9)
    assert 0 < expected0  # the uniform negative is closer than the margin allows: the hinge is active
    (grad,) = torch.autograd.grad(loss[0, 0], attn)
    assert grad[0, 0].abs().max() == 0  # the anchor row gets no gradient from its own term
    assert grad[0, 1].abs().max() > 0 and grad[0, 3].abs().max() > 0
    # the same distance as the clustering's
    assert symmetric_kl(attn[0, :1].detach(), attn[0, 1:2].detach()).item() == pytest.approx(d01, rel=1e-9)


def test_entropy_weights():
    k = 6
    peaked = torch.tensor([1.0, 0, 0, 0, 0, 0])
    medium = torch.tensor([0.5, 0.5, 0, 0, 0, 0])
    flat = torch.full((k,), 1 / k)
    w = entropy_weights(torch.stack([flat, peaked, medium, medium]).unsqueeze(0))
    assert w.shape == (1, 4)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert w[0, 1] > w[0, 2] > w[0, 0]
    assert w[0, 2].item() == pytest.approx(w[0, 3].item())
    # softmax(-H): H = log k, 0, log 2, log 2 -> weights proportional to 1/k, 1, 1/2, 1/2
    expected = torch.tensor([1 / k, 1, 0.5, 0.5])
    torch.testing.assert_close(w[0], expected / expected.sum(), atol=1e-6, rtol=0)
    two = entropy_weights(torch.stack([torch.stack([flat, peaked]), torch.stack([peaked, flat])]))
    torch.testing.assert_close(two.sum(1), torch.ones(2))  # normalised per clip


def test_effective_sample_size_of_the_entropy_weights():
    n = 12
    uniform = torch.full((1, n), 1 / n)
    one_row = torch.zeros(1, n)
    one_row[0, 3] = 1.0
    half = torch.zeros(1, n)
    half[0, :4] = 0.25
    sizes = effective_sample_size(torch.cat([uniform, one_row, half]))
    torch.testing.assert_close(sizes, torch.tensor([float(n), 1.0, 4.0]))


def test_total_loss_is_the_weighted_sum_of_the_parts():
    model = make_model(15)
    tokens = make_tokens(16, batch=2, frames=FRAMES)
    params = LossParams(num_pos=2, num_neg=5, semantic_margin=0.8, motion_margin=1.0)
    with torch.no_grad():
        fused, attn = model(tokens, with_attention=True)
        loss, parts = correlator_loss(fused, attn, params)
        features = fused[:, :, 1:].reshape(2, FRAMES * N_PATCH, DIM)
        pos, neg = sample_pos_neg(attn, FRAMES, 2, 5)
        per_row = semantic_margin_loss(features, pos, neg, 0.8) + motion_margin_loss(attn, pos, neg, 1.0)
        expected = (entropy_weights(attn) * per_row).sum(1).mean()
        fused_other_cls = fused.clone()
        fused_other_cls[:, :, 0] = 5.0
        loss_other_cls, _ = correlator_loss(fused_other_cls, attn, params)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["semantic"] + parts["motion"] == pytest.approx(loss.item(), rel=1e-5)
    assert parts["semantic"] > 0 and parts["motion"] > 0
    assert parts["ess"] == pytest.approx(effective_sample_size(entropy_weights(attn)).mean().item())
    assert 1 <= parts["ess"] <= FRAMES * N_PATCH
    assert loss_other_cls.item() == pytest.approx(loss.item(), rel=1e-6)  # CLS is not a patch


# ----------------------------------------------------------------------------------------------------------
# Training and checkpoints


def toy_clips(seed: int, batch: int, count: int):
    """Clips of two 'objects': every patch is its object's vector plus noise; the object on the left
    moves one column right per frame. Made under inference_mode, like the backbone's output."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(2, DIM, generator=g)
    h, w = GRID
    for _ in range(count):
        with torch.inference_mode():
            tokens = torch.empty(batch, FRAMES, 1 + N_PATCH, DIM)
            for t in range(FRAMES):
                label = (torch.arange(w) >= 2 + t).long().repeat(h)  # (h*w,) 0 = object, 1 = background
                tokens[:, t, 1:] = centres[label] + torch.randn(batch, N_PATCH, DIM, generator=g)
                tokens[:, t, 0] = centres.mean(0)
        yield tokens


LOSS = LossParams(num_pos=2, num_neg=5, semantic_margin=0.8, motion_margin=1.0)


def test_training_reduces_the_loss_on_a_toy_problem():
    torch.manual_seed(17)
    model = TemporalCorrelator(DIM, HEADS, 4.0, FRAMES)
    steps = 40
    losses = train_correlator(model, toy_clips(18, 2, steps), steps, 1e-3, 0.0, LOSS, None, None)
    assert len(losses) == steps
    first = sum(losses[:3]) / 3
    last = sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("drop", [(0.0, 0.0), (0.4, 0.1)], ids=["no-dropout", "dropout"])
def test_checkpoint_round_trip_and_resume(tmp_path, drop):
    torch.manual_seed(19)
    straight = TemporalCorrelator(DIM, HEADS, 4.0, FRAMES, *drop)
    start = {k: v.clone() for k, v in straight.state_dict().items()}
    batches = list(toy_clips(20, 2, 4))
    train_correlator(straight, iter(batches), 4, 1e-3, 0.05, LOSS, None, None, seed=3)

    path = tmp_path / "ckpt" / "correlator.pt"
    first = TemporalCorrelator(DIM, HEADS, 4.0, FRAMES, *drop)
    first.load_state_dict(start)
    losses = train_correlator(first, iter(batches[:2]), 2, 1e-3, 0.05, LOSS, path, 1, seed=3)
    assert len(losses) == 2 and path.is_file()
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temporary file

    # load into a fresh model and optimizer: everything comes back
    fresh = TemporalCorrelator(DIM, HEADS, 4.0, FRAMES)
    optimizer = make_optimizer(fresh, 1e-3, 0.05)
    assert load_checkpoint(path, fresh, optimizer) == 2
    for key, value in first.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    state = optimizer.state_dict()["state"]
    assert len(state) == len(list(fresh.parameters())) and all(int(s["step"]) == 2 for s in state.values())

    # resume from the file: two more steps, and the result equals four uninterrupted steps
    resumed = TemporalCorrelator(DIM, HEADS, 4.0, FRAMES, *drop)
    more = train_correlator(resumed, iter(batches[2:]), 4, 1e-3, 0.05, LOSS, path, None, seed=3)
    assert len(more) == 2
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-6, rtol=1e-5)
    assert load_checkpoint(path, TemporalCorrelator(DIM, HEADS, 4.0, FRAMES)) == 4
    # nothing left to do: no step runs, the model is the checkpoint's
    assert train_correlator(resumed, iter(batches), 4, 1e-3, 0.05, LOSS, path, None) == []

    other = TemporalCorrelator(DIM, HEADS, 4.0, FRAMES)
    save_checkpoint(path, other, make_optimizer(other, 1e-3, 0.0), 7)
    assert load_checkpoint(path, fresh) == 7
    assert torch.equal(fresh.temporal, other.temporal)


# ----------------------------------------------------------------------------------------------------------
# Clip augmentation


def test_clip_augment_applies_one_crop_and_flip_to_all_frames():
    g = torch.Generator().manual_seed(21)
    base = torch.rand(3, 40, 60, generator=g)
    frames = torch.stack([base + t for t in range(4)])  # frame t = frame 0 + t everywhere
    flips = set()
    for seed in range(12):
        kwargs = dict(size=(16, 24), scale=(0.2, 1.0), ratio=(0.75, 1.333), flip_prob=0.5)
        out = clip_augment(frames, torch.Generator().manual_seed(seed), **kwargs)
        assert out.shape == (4, 3, 16, 24)
        for t in range(4):  # the same box and flip on every frame: the constant offset survives
            torch.testing.assert_close(out[t] - out[0], torch.full_like(out[0], float(t)), atol=1e-5, rtol=0)
        crop = sample_crop(40, 60, torch.Generator().manual_seed(seed), (0.2, 1.0), (0.75, 1.333), 0.5)
        assert 0 <= crop.top and crop.top + crop.height <= 40
        assert 0 <= crop.left and crop.left + crop.width <= 60
        torch.testing.assert_close(out, apply_crop(frames, crop, (16, 24)))
        window = frames[0, :, crop.top : crop.top + crop.height, crop.left : crop.left + crop.width]
        resized = torch.nn.functional.interpolate(
            window[None], size=(16, 24), mode="bilinear", align_corners=False, antialias=True
        )[0]
        torch.testing.assert_close(out[0], resized.flip(-1) if crop.flip else resized)
        flips.add(crop.flip)
    assert flips == {True, False}
    # flip_prob 1 vs 0 with the same draws: the same crop, mirrored
    kwargs = dict(size=(16, 24), scale=(0.2, 1.0), ratio=(0.75, 1.333))
    a = clip_augment(frames, torch.Generator().manual_seed(3), flip_prob=1.0, **kwargs)
    b = clip_augment(frames, torch.Generator().manual_seed(3), flip_prob=0.0, **kwargs)
    torch.testing.assert_close(a, b.flip(-1))
    assert not torch.allclose(a, b)
