"""FOUND's trained head: ``make train-found`` (pipeline/train_found.py) on tiny generated images, resumed
after a kill to the same weights, its batching and caching at a realistic image count; ``method.head``:
a trained head finds the planted object, a missing head is one clear error, head=null changes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.config import load_config, replace
from pipeline.resolve import resolve
from pipeline.runs import RunDir
from pipeline.train_found import (
    CHECKPOINT,
    TARGETS,
    USE_KEYS,
    batch_indices,
    resolve_found_head,
    train_found,
    training_view,
)
from stages.common.masks import components
from stages.discovery.base import METHODS, PatchFeatures
from stages.discovery.found import FoundState, cls_attention, found
from tests.scenes import box_mask
from tests.scenes import cls_attention as synthetic_attention
from tests.synthetic import object_image


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def write_images(root: Path, n: int, size: tuple[int, int] = (40, 56)) -> Path:
    """n small images, each a red rectangle at its own place on a dark background."""
    root.mkdir(parents=True, exist_ok=True)
    height, width = size
    for i in range(n):
        y0, x0 = 4 + i % 7 * 2, 4 + i % 11 * 2
        Image.fromarray(object_image(height, width, (y0, x0, y0 + 18, x0 + 24), seed=i)).save(
            root / f"{i:04d}.png"
        )
    return root


def tiny_config(images: Path, out: Path, *extra: str):
    """FOUND on the random tiny ViT (patch 8), 32 px training views (4x4 patches), a short schedule that
    crosses the loss switch and learning-rate steps."""
    overrides = [
        f"dataset.root={images}",
        f"run.out_dir={out}",
        "backbone.arch=test_vit_tiny",
        "backbone.random_init=true",
        "backbone.device=cpu",
        "backbone.batch_size=3",
        "method.no_object=null",
        "method.training.crop_size=32",
        "method.training.batch_size=4",
        "method.training.max_steps=6",
        "method.training.coarse_steps=3",
        "method.training.step_size=2",
        "method.training.checkpoint_every=2",
        *extra,
    ]
    return load_config("imagefolder", "found", overrides)


class Stop(Exception):
    """Raised from the training's step callback: a deterministic kill point."""


def stop_at(step: int):
    def on_step(done: int) -> None:
        if done == step:
            raise Stop

    return on_step


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["head"]


def test_training_killed_after_a_step_resumes_to_the_same_weights(tmp_path):
    images = write_images(tmp_path / "images", 10)
    straight = train_found(tiny_config(images, tmp_path / "straight"))
    state = torch.load(straight, weights_only=True)
    assert state["step"] == 6 and state["channels"] == 48
    assert (straight.parent / TARGETS).is_file() and (straight.parent / "tensorboard").is_dir()

    cfg = tiny_config(images, tmp_path / "killed")
    with pytest.raises(Stop):
        train_found(cfg, on_step=stop_at(3))  # killed after step 3: the last checkpoint is step 2's
    checkpoint = (tmp_path / "killed").glob(f"found_head/*/{CHECKPOINT}")
    (checkpoint,) = list(checkpoint)
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    resumed = train_found(cfg)
    assert resumed == checkpoint and torch.load(resumed, weights_only=True)["step"] == 6
    for name, value in weights(straight).items():
        assert torch.equal(value, weights(resumed)[name]), name
    # A finished run returns its checkpoint and trains no more.
    mtime = resumed.stat().st_mtime_ns
    assert train_found(cfg) == resumed and resumed.stat().st_mtime_ns == mtime
    # method.head=trained finds it, whatever the keys that only say how it is used.
    used = replace(cfg, **{"method.head": "trained", "method.min_patches": 3, "method.refine": "none"})
    assert resolve(used).method.head == str(resumed)
    # ... and the scalars are in TensorBoard, one point per step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(resumed.parent / "tensorboard"))
    board.Reload()
    assert {"loss/total", "loss/refined", "loss/coarse", "loss/self", "learning_rate"} <= set(
        board.Tags()["scalars"]
    )
    assert [e.step for e in board.Scalars("loss/total")] == [1, 2, 3, 4, 5, 6]


def test_hundreds_of_images_give_the_same_head_whatever_the_cache(tmp_path):
    """300 images through the targets pass, chunked backbone passes and batches of 64: with no cache, a
    cache smaller than the features (evictions) and one that holds them all, the same weights."""
    images = write_images(tmp_path / "images", 300)
    heads = []
    for budget in (0, 1, 100):
        cfg = tiny_config(
            images,
            tmp_path / f"cache{budget}",
            "backbone.batch_size=16",
            "method.training.batch_size=64",
            "method.training.max_steps=4",
            f"method.training.feature_cache_mb={budget}",
        )
        path = train_found(cfg)
        targets = torch.load(path.parent / TARGETS, weights_only=True)
        assert targets["targets"].shape == (300, 4, 4) and len(targets["file_names"]) == 300
        heads.append(weights(path))
    for other in heads[1:]:
        for name, value in heads[0].items():
            assert torch.equal(value, other[name]), name


def test_batches_cover_every_image_equally():
    for n, batch in ((300, 64), (5, 50), (7, 3)):
        steps = n * batch // np.gcd(n, batch) // batch  # whole epochs
        seen = np.concatenate([batch_indices(n, batch, 0, s) for s in range(steps)])
        assert np.all(np.bincount(seen, minlength=n) == len(seen) // n)
        assert all(len(batch_indices(n, batch, 0, s)) == batch for s in range(steps))
    assert np.array_equal(batch_indices(300, 64, 1, 5), batch_indices(300, 64, 1, 5))
    assert not np.array_equal(batch_indices(300, 64, 1, 0), batch_indices(300, 64, 2, 0))


def test_training_view_is_a_centre_square_of_the_shorter_side():
    rgb = np.zeros((60, 120, 3), np.uint8)
    rgb[:, 50:70] = 255  # a white band in the middle of the width
    view = training_view(rgb, 36, 8)  # 36 -> 32 (a multiple of the patch)
    assert view.shape == (32, 32, 3) and view.flags.writeable
    assert view[:, 14:18].min() > 200 and view[:, :8].max() < 30 and view[:, -8:].max() < 30


# ----------------------------------------------------------------------------------------------------------
# method.head


GRID = (12, 16)
OBJECT = (3, 4, 9, 11)  # y0, x0, y1, x1 on the patch grid


def planted_features(seed: int = 0) -> tuple[PatchFeatures, np.ndarray]:
    """Keys of 8 channels: channel 0 is 1 on the planted object, 0 elsewhere, the rest noise; CLS attention
    that has the object as well as a decoy stretch of background."""
    truth = box_mask(GRID, OBJECT)
    rng = np.random.default_rng(seed)
    keys = 0.1 * rng.standard_normal((truth.size, 8))
    keys[:, 0] = truth.reshape(-1)
    attention = torch.zeros(4, 1 + truth.size, 1 + truth.size)
    attention[:, 0, 1:] = synthetic_attention(truth, heads=4, focused=2, decoy=(0, 12, 4, 16), seed=seed)
    feats = PatchFeatures(
        torch.from_numpy(keys).float(), GRID, "dino", patch=8, attention=attention, key_bias=torch.zeros(8)
    )
    return feats, truth


def write_head(path: Path, channels: int = 8) -> Path:
    """A head that reads channel 0: logit = 10 * (k0 - 0.5)."""
    state = FoundState.new(channels, load_config("demo", "found").method.training.schedule(), seed=0)
    with torch.no_grad():
        state.head.conv.weight.zero_()
        state.head.conv.weight[0, 0] = 10.0
        state.head.conv.bias.fill_(-5.0)
    torch.save(state.state_dict(), path)
    return path


def found_method(*overrides: str):
    cfg = load_config("demo", "found", ["method.no_object=null", *overrides]).method
    return METHODS.get("found").from_config(cfg)


def test_a_trained_head_finds_the_planted_object(tmp_path):
    feats, truth = planted_features()
    head = write_head(tmp_path / "head.pth")
    masks = found_method(f"method.head={head}")(feats)
    assert len(masks) == 1 and np.array_equal(masks[0], truth)


def test_head_null_is_the_training_free_rule():
    feats, _ = planted_features(seed=3)
    cfg = load_config("demo", "found", ["method.no_object=null"]).method
    assert cfg.head is None
    expected = found(feats.keys, cls_attention(feats.attention), GRID, cfg.tau, cfg.reweight)
    masks = found_method()(feats)
    assert masks and [m.tolist() for m in masks] == [
        c.tolist() for c in components(expected) if c.sum() >= cfg.min_patches
    ]


def test_a_missing_head_is_one_clear_error(tmp_path, capsys):
    # random weights: no note about the backbone's weights comes before the error
    args = ["--dataset", "demo", "--method", "found", f"run.out_dir={tmp_path}", "backbone.random_init=true"]
    missing = tmp_path / "no-such-head.pth"
    assert main(["pseudolabels", *args, f"method.head={missing}"]) == 2
    assert capsys.readouterr().err == f"error: config key 'method.head': no such file '{missing}'\n"
    assert main(["pseudolabels", *args, "method.head=trained"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: config key 'method.head': no head trained for dataset 'demo'")
    assert "make train-found DATASET=demo" in line


def test_a_head_of_another_backbone_or_not_a_head_is_one_clear_error(tmp_path, capsys):
    args = ["--dataset", "demo", "--method", "found", f"run.out_dir={tmp_path}", "backbone.random_init=true"]
    args.append("backbone.arch=dino_vits16")
    head = write_head(tmp_path / "head.pth", channels=8)
    assert main(["pseudolabels", *args, f"method.head={head}"]) == 2
    assert capsys.readouterr().err == (
        f"error: config key 'method.head': the head '{head}' reads keys of 8 channels, backbone dino_vits16 "
        "gives 384: train one with this backbone (make train-found)\n"
    )
    # torch fails on each with another exception type (UnpicklingError, EOFError, IndexError; a photo's
    # UnpicklingError text ends in advice to load it with code execution on): one line, none of that text.
    photo = sorted(Path("data/demo/images").glob("*.jpg"))[0].read_bytes()
    for name, content in (
        ("a.pth", b"not a checkpoint"),
        ("b.pth", b""),
        ("notes.txt", b"a note\n"),
        ("c.jpg", photo),
    ):
        (tmp_path / name).write_bytes(content)
        assert main(["pseudolabels", *args, f"method.head={tmp_path / name}"]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: config key 'method.head': cannot read '{tmp_path / name}' as a torch")
        assert line.endswith("not a FOUND head (make train-found writes one)") and "weights_only" not in line
    torch.save({"head": {}}, tmp_path / "other.pth")
    assert main(["pseudolabels", *args, f"method.head={tmp_path / 'other.pth'}"]) == 2
    assert capsys.readouterr().err.endswith(
        "is not a FOUND head checkpoint (make train-found writes one): no 'channels' entry\n"
    )


def test_a_given_head_path_is_kept_absolute(tmp_path):
    head = write_head(tmp_path / "head.pth", channels=48)
    cfg = load_config("demo", "found", [f"method.head={head}", "backbone.arch=test_vit_tiny"])
    assert resolve_found_head(cfg).method.head == str(head)
    with pytest.raises(FileNotFoundError, match="method.head"):
        found_method(f"method.head={tmp_path / 'gone.pth'}")


def test_a_head_rewritten_in_place_gives_new_runs(tmp_path):
    # make train-found resumes into the same file: labels made with the old weights must not be reused.
    head = write_head(tmp_path / "head.pth", channels=48)
    args = [f"method.head={head}", "backbone.arch=test_vit_tiny", "backbone.random_init=true"]
    cfg = resolve(load_config("demo", "found", [*args, f"run.out_dir={tmp_path}"]))
    before = {stage: RunDir.for_config(cfg, stage).path for stage in ("pseudolabels", "selftrain")}
    torch.save(torch.load(head, weights_only=True), head)  # the same weights written again
    assert {stage: RunDir.for_config(cfg, stage).path for stage in before} == before
    state = torch.load(head, weights_only=True)
    state["head"]["conv.bias"] += 1.0
    torch.save(state, head)
    after = {stage: RunDir.for_config(cfg, stage).path for stage in before}
    assert all(after[stage] != before[stage] for stage in before)
    training = RunDir.for_config(cfg, "found_head", USE_KEYS).path  # where the head trains: not keyed by it
    write_head(head, channels=48)
    assert RunDir.for_config(cfg, "found_head", USE_KEYS).path == training
