"""Backbone: weights only from local files, both checkpoint layouts, any input size."""

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from stages.features.backbone import ARCHS, Backbone, WeightsError, find_weights, input_size, prepare_image

ARCH = "test_vit_tiny"


def tiny_timm_model(seed=1):
    torch.manual_seed(seed)
    spec = ARCHS[ARCH]
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.timm_kwargs)


def image_batch(height=64, width=80):
    rng = np.random.default_rng(0)
    return prepare_image(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), 8, None)[None]


def test_dino_training_checkpoint_layout_loads(tmp_path):
    # DINO's training checkpoints keep the backbone as teacher['module.backbone.*'] beside its head.
    state = tiny_timm_model().state_dict()
    teacher = {f"module.backbone.{k}": v for k, v in state.items()}
    teacher["module.head.mlp.0.weight"] = torch.zeros(3, 3)
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    loaded = Backbone(ARCH, path, "cpu")
    for key, value in state.items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_plain_dino_pth_and_timm_safetensors_give_the_same_features(tmp_path):
    state = tiny_timm_model().state_dict()
    torch.save(state, tmp_path / "plain.pth")
    save_file(state, tmp_path / "model.safetensors")
    a = Backbone(ARCH, tmp_path / "plain.pth", "cpu")(image_batch()).keys
    b = Backbone(ARCH, tmp_path / "model.safetensors", "cpu")(image_batch()).keys
    assert torch.equal(a, b)


def test_dinov2_mask_token_is_ignored(tmp_path):
    state = tiny_timm_model().state_dict()
    torch.save(state, tmp_path / "plain.pth")
    state["mask_token"] = torch.zeros(1, 48)
    torch.save(state, tmp_path / "v2.pth")
    loaded = Backbone(ARCH, tmp_path / "v2.pth", "cpu")
    assert "mask_token" not in loaded.model.state_dict()
    for key, value in loaded.model.state_dict().items():  # every other weight is the checkpoint's
        assert torch.equal(value, state[key]), key
    plain = Backbone(ARCH, tmp_path / "plain.pth", "cpu")
    assert torch.equal(loaded(image_batch()).keys, plain(image_batch()).keys)


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"this is not a checkpoint",
            r"^weights file: cannot read '.*wrong.pth' as a torch checkpoint \(\w+Error: [^\n]*\)$",
        ),
        (
            b"a note\n",
            r"^weights file: cannot read '.*wrong.pth' as a torch checkpoint \(\w+Error: [^\n]*\)$",
        ),
        ({"blocks.0.norm1.weight": torch.zeros(48)}, f"does not fit backbone {ARCH}: missing keys"),
    ],
)
def test_wrong_files_are_rejected_clearly(tmp_path, content, message):
    path = tmp_path / "wrong.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=message):
        Backbone(ARCH, path, "cpu")


def test_a_checkpoint_of_another_architecture_is_rejected(tmp_path):
    other = timm.create_model(
        "vit_small_patch8_224",
        pretrained=False,
        num_classes=0,
        depth=2,
        embed_dim=96,
        num_heads=3,
        img_size=64,
    )
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="has shape"):
        Backbone(ARCH, tmp_path / "other.pth", "cpu")


def test_no_weights_stops_with_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("PIPELINE_WEIGHTS", raising=False)
    assert find_weights("dino_vitb8", None) is None
    with pytest.raises(WeightsError, match="dino_vitbase8_pretrain.pth") as err:
        Backbone("dino_vitb8", None, "cpu")
    assert str(tmp_path) in str(err.value)  # names the directory to put the file in
    with pytest.raises(WeightsError, match="no such file"):
        find_weights("dino_vitb8", str(tmp_path / "missing.pth"))


def test_weights_are_found_by_official_name(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_WEIGHTS", str(tmp_path))
    (tmp_path / "dino_deitsmall16_pretrain.pth").write_bytes(b"x")
    assert find_weights("dino_vits16", None) == tmp_path / "dino_deitsmall16_pretrain.pth"


def test_features_at_any_size_and_lean_keys_match_the_full_forward():
    backbone = Backbone(ARCH, None, "cpu", random_init=True)
    feats = backbone(image_batch(40, 72), want=("keys", "queries", "values", "attention", "tokens"))
    assert feats.grid == (5, 9)
    assert feats.keys.shape == (1, 1 + 45, 48)
    assert feats.attention.shape == (1, 3, 46, 46)
    assert torch.allclose(feats.attention.sum(-1), torch.ones(1, 3, 46))
    # At the native size the lean pass equals timm's own forward.
    x = image_batch(64, 64)
    assert torch.allclose(backbone(x, want=("tokens",)).tokens, backbone.model.forward_features(x), atol=1e-5)
    # Keys are the last block's qkv keys: hook timm's own module to check.
    seen = {}
    handle = backbone.model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: seen.update(qkv=o))
    backbone.model.forward_features(x)
    handle.remove()
    assert torch.allclose(backbone(x).keys, seen["qkv"][..., 48:96], atol=1e-5)


def test_queries_keys_values_and_attention_are_the_last_blocks_own():
    # BA's baseline reads queries and attention, MaskCut/TokenCut/LOST the keys: each must be its own
    # slice of timm's qkv output (q, k, v in that order), heads concatenated;
    # attention = softmax(q k^T / sqrt(head_dim)).
    backbone = Backbone(ARCH, None, "cpu", random_init=True)
    x = image_batch(64, 64)
    seen = {}
    handle = backbone.model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: seen.update(qkv=o))
    backbone.model.forward_features(x)
    handle.remove()
    q, k, v = seen["qkv"].split(48, dim=-1)
    feats = backbone(x, want=("keys", "queries", "values", "attention"))
    assert not torch.allclose(q, k, atol=1e-3)  # random weights: a swap would show
    assert torch.allclose(feats.queries, q, atol=1e-5)
    assert torch.allclose(feats.keys, k, atol=1e-5)
    assert torch.allclose(feats.values, v, atol=1e-5)
    heads = lambda t: t.reshape(1, -1, 3, 16).transpose(1, 2)  # noqa: E731  (B, heads, n, head_dim)
    expected = torch.softmax(heads(q) @ heads(k).transpose(-2, -1) / 16**0.5, dim=-1)
    assert torch.allclose(feats.attention, expected, atol=1e-5)


def test_bfloat16_precision_autocasts_and_returns_float32_close_to_the_float32_pass():
    x = image_batch()
    want = ("keys", "attention")
    exact = Backbone(ARCH, None, "cpu", random_init=True)(x, want)
    fast = Backbone(ARCH, None, "cpu", random_init=True, precision="bfloat16")(x, want)
    assert fast.keys.dtype == fast.attention.dtype == torch.float32
    assert not torch.equal(fast.keys, exact.keys)  # the pass really ran in bfloat16
    cosine = torch.nn.functional.cosine_similarity(fast.keys, exact.keys, dim=-1)
    assert cosine.min() > 0.99
    assert torch.allclose(fast.attention, exact.attention, atol=2e-2)


def test_random_init_is_explicit_and_reproducible():
    with pytest.raises(WeightsError):
        Backbone(ARCH, None, "cpu")
    a = Backbone(ARCH, None, "cpu", random_init=True, seed=3)(image_batch()).keys
    b = Backbone(ARCH, None, "cpu", random_init=True, seed=3)(image_batch()).keys
    assert torch.equal(a, b)


def test_input_size_rounds_the_resize_and_pads_otherwise():
    assert input_size(375, 500, 16, None) == (384, 512)
    assert input_size(375, 500, 14, 480) == (476, 476)
    assert input_size(375, 500, 8, 480) == (480, 480)
    x = prepare_image(np.zeros((30, 50, 3), np.uint8), 16, None)
    assert x.shape == (3, 32, 64) and torch.all(x[:, 30:] == 0) and torch.all(x[:, :, 50:] == 0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_arch_states_the_width_of_its_keys(arch):
    spec = ARCHS[arch]
    with torch.device("meta"):  # no memory for the weights: only their shapes are read
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.timm_kwargs)
    assert model.blocks[-1].attn.qkv.weight.shape[1] == model.embed_dim == spec.channels


def test_a_named_weights_file_is_checked_before_any_work_and_its_architecture_suggested(tmp_path):
    """backbone.weights is checked when the config is resolved (one line, before Ray starts workers); a file
    of another architecture names the one it fits."""
    from pipeline.config import load_config
    from pipeline.runs import resolve_backbone

    tiny = tmp_path / "tiny.pth"
    torch.save(Backbone(ARCH, None, "cpu", random_init=True).model.state_dict(), tiny)
    cfg = load_config("demo", "maskcut", ["backbone.arch=dino_vits16", f"backbone.weights={tiny}"])
    with pytest.raises(WeightsError, match=rf"does not fit backbone dino_vits16: .*; it fits {ARCH}: set"):
        resolve_backbone(cfg)
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"a note\n")
    with pytest.raises(WeightsError, match="cannot read .*notes.txt' as a torch checkpoint"):
        resolve_backbone(load_config("demo", "maskcut", [f"backbone.weights={notes}"]))
    fits = load_config("demo", "maskcut", [f"backbone.arch={ARCH}", f"backbone.weights={tiny}"])
    assert resolve_backbone(fits).backbone.weights == str(tiny)
