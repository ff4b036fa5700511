"""ViTDet on DINOv2 (stages/detection/vitdet.py): configs build, DINOv2 weights convert exactly and load with
no missing or unexpected keys, training uses DropLoss at every cascade stage, copy-paste and layer-wise lr
decay, the pipeline picks it when no ResNet-50 is given, and a trained detector loads in one call."""

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from PIL import Image

from pipeline import load_detector, selftrain
from pipeline.config import ConfigError, load_config
from pipeline.runs import RunError
from stages.common.export import coco_file, mask_annotation
from stages.common.io import BadImage
from stages.detection import copy_paste, train
from stages.detection.droploss import DropLossFastRCNNOutputLayers
from stages.detection.vitdet import (
    PATCH_RESIZE,
    ConversionError,
    build_optimizer,
    build_vit,
    dinov2_to_vitdet,
    is_vitdet,
)
from stages.features.backbone import Backbone, read_checkpoint, to_timm_keys
from tests.synthetic import object_image

MODELS = ("cascade_mask_rcnn_vitdet_s14", "mask_rcnn_vitdet_s14")
# A two-block ViT of DINOv2's design (the builder takes its size from MODEL.VIT) for the training tests.
TINY = {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 56}  # position grid 56 / 14 = 4
TINY_OPTS = [
    "MODEL.VIT.EMBED_DIM",
    48,
    "MODEL.VIT.DEPTH",
    2,
    "MODEL.VIT.NUM_HEADS",
    3,
    "MODEL.VIT.PRETRAIN_GRID",
    4,
]
SMALL_INPUT = [
    "INPUT.MIN_SIZE_TRAIN", [96], "INPUT.MAX_SIZE_TRAIN", 128,
    "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100,
    # narrow pyramid and heads: the tests are about wiring, not capacity
    "MODEL.VIT.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.CONV_DIM", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
]  # fmt: skip


def dinov2_state(seed: int = 0, **size) -> dict[str, torch.Tensor]:
    """A random DINOv2-shaped state dict in the published layout (timm keys plus iBOT's mask token), with
    LayerScale far from 1 so that folding it matters."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **size)
    state = model.state_dict()
    for key in state:
        if key.endswith(".gamma"):
            state[key] = torch.rand_like(state[key]) + 0.5
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return state


def d2_config(model: str = MODELS[0], round_index: int = 0, opts=(), schedule=("tiny_cpu",)):
    train_cfg = load_config(
        "demo",
        "maskcut",
        [f"train.model={model}", f"train.schedule={list(schedule)}", f"train.opts={list(opts)}"],
    ).train
    return train.detectron_cfg(train_cfg, round_index, ".", "", "cpu")


def vit_of(cfg, state: dict[str, torch.Tensor]):
    """The ViT of cfg's backbone with ``state`` converted and loaded strictly, in eval mode."""
    net = build_vit(cfg, in_chans=3)
    converted = dinov2_to_vitdet(to_timm_keys(state), cfg)
    net.load_state_dict({k.removeprefix("backbone.net."): v for k, v in converted.items()}, strict=True)
    return net.eval()


def upsample_patches(x: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Resize every old x old patch of (B, C, h*old, w*old) on its own to new x new (the FlexiViT resize)."""
    b, c, height, width = x.shape
    h, w = height // old, width // old
    patches = x.reshape(b, c, h, old, w, old).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, old, old)
    up = F.interpolate(patches, size=(new, new), mode=PATCH_RESIZE["interpolation"], align_corners=False,
                       antialias=PATCH_RESIZE["antialias"])  # fmt: skip
    return up.reshape(b, h, w, c, new, new).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * new, w * new)


# ----------------------------------------------------------------------------------------------------------
# Configs and weights


@pytest.mark.parametrize("model", MODELS)
def test_vitdet_configs_build_a_power_of_two_pyramid_with_droploss_heads(model):
    cfg = d2_config(model)
    assert is_vitdet(cfg) and cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.MODEL.ROI_HEADS.DROPLOSS.ENABLED
    assert cfg.INPUT.COPY_PASTE.ENABLED
    net = build_model(cfg)
    shapes = net.backbone.output_shape()
    assert {k: s.stride for k, s in shapes.items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    vit = net.backbone.net
    assert (len(vit.blocks), vit.pos_embed.shape, vit.patch_embed.proj.kernel_size) == (
        12,
        (1, 1370, 384),
        (16, 16),
    )
    assert net.backbone.size_divisibility == 32  # inputs padded to the coarsest stride
    heads = type(net.roi_heads).__name__
    assert heads == ("DropLossCascadeROIHeads" if model.startswith("cascade") else "DropLossROIHeads")
    # Self-training rounds: selftrain.yaml's SGD values are replaced by AdamW ones (half of round 0's lr).
    r1 = d2_config(model, round_index=1)
    assert (r1.SOLVER.BASE_LR, r1.SOLVER.WEIGHT_DECAY) == (cfg.SOLVER.BASE_LR / 2, cfg.SOLVER.WEIGHT_DECAY)
    assert not r1.MODEL.ROI_HEADS.DROPLOSS.ENABLED


def test_dinov2_weights_load_with_no_missing_or_unexpected_keys(tmp_path):
    state = dinov2_state()  # full ViT-S/14 shapes
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    cfg = d2_config()
    converted = dinov2_to_vitdet(to_timm_keys(read_checkpoint(tmp_path / "dinov2_vits14_pretrain.pth")), cfg)
    net = build_model(cfg)
    vit_keys = {f"backbone.net.{k}" for k in net.backbone.net.state_dict()}
    assert set(converted) == vit_keys  # every ViT tensor, nothing else (LayerScale folded, mask token unused)
    torch.save({"model": converted, "matching_heuristics": False}, tmp_path / "init.pth")
    DetectionCheckpointer(net).load(str(tmp_path / "init.pth"))
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in converted.items())
    gamma = state["blocks.3.ls2.gamma"]
    assert torch.equal(loaded["backbone.net.blocks.3.mlp.fc2.bias"], state["blocks.3.mlp.fc2.bias"] * gamma)
    assert torch.equal(loaded["backbone.net.cls_token"], state["cls_token"])


def test_checkpoints_that_do_not_fit_are_refused_by_key():
    cfg = d2_config(opts=TINY_OPTS)
    state = to_timm_keys(dinov2_state(**TINY))
    dinov2_to_vitdet(state, cfg)  # fits
    with pytest.raises(ConversionError, match="unexpected keys \\['reg_token'\\]"):
        dinov2_to_vitdet({**state, "reg_token": torch.zeros(1, 4, 48)}, cfg)  # DINOv2 with registers
    with pytest.raises(ConversionError, match="missing keys \\['blocks.1.mlp.fc1.bias'\\]"):
        dinov2_to_vitdet({k: v for k, v in state.items() if k != "blocks.1.mlp.fc1.bias"}, cfg)
    with pytest.raises(ConversionError, match="'pos_embed' has shape"):
        dinov2_to_vitdet(to_timm_keys(dinov2_state(**{**TINY, "img_size": 70})), cfg)  # a 5x5 grid
    with pytest.raises(ConversionError, match="blocks.1.ls2.gamma"):
        dinov2_to_vitdet({k: v for k, v in state.items() if not k.startswith("blocks.1.mlp.fc2")}, cfg)


def test_converted_backbone_computes_dinov2s_tokens(tmp_path):
    """The converted ViT against timm's DINOv2 as the pseudo-labeller runs it (stages/features/backbone.py):
    on the same input with a 14-px patch, and with the 16-px patch on the input whose patches are each
    upsampled to 16 px (FlexiViT's exact case), at a grid other than the checkpoint's (position embedding
    resized)."""
    state = dinov2_state(seed=1)
    torch.save(state, tmp_path / "dinov2.pth")
    dinov2 = Backbone("dinov2_vits14", tmp_path / "dinov2.pth", "cpu")
    x14 = torch.randn(2, 3, 3 * 14, 5 * 14, generator=torch.Generator().manual_seed(0))
    expected = dinov2(x14, want=("tokens",)).tokens[:, 1:]  # (B, 15, 384), final-normed patch tokens
    for patch, x in ((14, x14), (16, upsample_patches(x14, 14, 16))):
        net = vit_of(d2_config(opts=["MODEL.VIT.PATCH_SIZE", patch]), state)
        with torch.no_grad():
            got = net(x)["last_feat"]  # (B, 384, 3, 5)
        assert got.shape == (2, 384, 3, 5)
        torch.testing.assert_close(got.flatten(2).transpose(1, 2), expected, rtol=1e-4, atol=1e-4)
    # Without the patch-wise upsampling the 16-px model sees another image: the check above is not vacuous.
    with torch.no_grad():
        plain = net(F.interpolate(x14, scale_factor=16 / 14, mode="bilinear"))["last_feat"]
    assert (plain.flatten(2).transpose(1, 2) - expected).abs().max() > 0.1


def test_layerwise_learning_rate_decay_follows_vitdet():
    cfg = d2_config()
    net = build_model(cfg)
    opt = build_optimizer(cfg, net)
    assert isinstance(opt, torch.optim.AdamW)
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = dict(net.named_parameters())
    base, decay = cfg.SOLVER.BASE_LR, cfg.MODEL.VIT.LR_DECAY_RATE

    def lr(name):
        return group[id(params[name])]["lr"]

    assert lr("backbone.net.patch_embed.proj.weight") == pytest.approx(base * decay**13)
    assert (
        lr("backbone.net.pos_embed")
        == lr("backbone.net.cls_token")
        == lr("backbone.net.patch_embed.proj.weight")
    )
    assert lr("backbone.net.blocks.0.attn.qkv.weight") == pytest.approx(base * decay**12)
    assert lr("backbone.net.blocks.11.mlp.fc2.weight") == pytest.approx(base * decay)
    assert (
        lr("backbone.net.norm.weight")
        == lr("roi_heads.box_predictor.0.cls_score.weight")
        == pytest.approx(base)
    )
    for name in ("backbone.net.pos_embed", "backbone.net.cls_token", "backbone.net.blocks.4.norm1.weight"):
        assert group[id(params[name])]["weight_decay"] == 0.0
    assert (
        group[id(params["backbone.net.blocks.4.attn.qkv.weight"])]["weight_decay"] == cfg.SOLVER.WEIGHT_DECAY
    )


# ----------------------------------------------------------------------------------------------------------
# Training


def write_dataset(root, n: int = 4):
    """n images with one planted object each and its mask as the label file (labels.json)."""
    images, annotations = [], []
    for i in range(n):
        box = (20, 10 + 8 * i, 70, 70 + 8 * i)
        Image.fromarray(object_image(96, 128, box, seed=i)).save(root / f"img{i}.png")
        mask = np.zeros((96, 128), bool)
        mask[box[0] : box[2], box[1] : box[3]] = True
        images.append({"id": i + 1, "file_name": f"img{i}.png", "width": 128, "height": 96})
        annotations.append(mask_annotation(mask, i + 1))
    (root / "labels.json").write_text(json.dumps(coco_file(images, annotations)))
    return root / "labels.json"


def test_vitdet_trains_with_droploss_at_every_stage_and_copy_paste_then_loads_in_one_call(
    tmp_path, monkeypatch
):
    data = tmp_path / "data"
    data.mkdir()
    labels = write_dataset(data)
    state = dinov2_state(**TINY)
    opts = [*TINY_OPTS, *SMALL_INPUT, "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 100, "SEED", 0]
    out = tmp_path / "round0"
    out.mkdir()
    cfg = d2_config(opts=opts)
    torch.save({"model": dinov2_to_vitdet(state, cfg), "matching_heuristics": False}, out / "init.pth")
    cfg = train.detectron_cfg(
        load_config("demo", "maskcut", ["train.schedule=[tiny_cpu]", f"train.model={MODELS[0]}",
                                        f"train.opts={opts}"]).train,
        0, out, str(out / "init.pth"), "cpu",
    )  # fmt: skip
    cfg.DATASETS.TRAIN = ("vitdet-test",)
    train.register_labels("vitdet-test", labels, str(data))

    stages, pastes = [], []
    original_weights, original_paste = DropLossFastRCNNOutputLayers.proposal_weights, copy_paste.copy_paste

    def weights_spy(self, predictions, proposals):
        stages.append(id(self))
        return original_weights(self, predictions, proposals)

    monkeypatch.setattr(DropLossFastRCNNOutputLayers, "proposal_weights", weights_spy)
    monkeypatch.setattr(
        copy_paste, "copy_paste", lambda batch, *a: pastes.append(len(batch)) or original_paste(batch, *a)
    )

    trainer = train.build_trainer(cfg)
    trainer.resume_or_load(resume=False)
    start = trainer.model.state_dict()["backbone.net.blocks.1.attn.proj.weight"]
    assert torch.equal(start, state["blocks.1.attn.proj.weight"] * state["blocks.1.ls1.gamma"][:, None])
    trainer.train()

    predictors = trainer.model.roi_heads.box_predictor
    assert len(predictors) == 3 and all(p.droploss_enabled for p in predictors)
    assert len(stages) == 2 * 3 and len(set(stages)) == 3  # two steps, DropLoss weights at all three stages
    assert pastes == [2, 2]  # both training batches went through copy-paste
    assert np.isfinite(trainer.storage.history("total_loss").latest())
    assert isinstance(trainer.optimizer, torch.optim.AdamW)

    (out / "config.yaml").write_text(cfg.dump())
    det = load_detector(out, device="cpu", max_detections=5)
    result = det(object_image(96, 128, (20, 30, 70, 90)))
    n = len(result.scores)
    assert n <= 5 and result.boxes.shape == (n, 4) and result.masks.shape == (n, 96, 128)
    with pytest.raises(BadImage, match=r"expected an \(H, W, 3\) uint8 RGB array, got shape \(96, 128\)"):
        det(np.zeros((96, 128), np.uint8))  # a grey image: one clear error, not an IndexError


# ----------------------------------------------------------------------------------------------------------
# Choosing the detector


def test_auto_picks_vitdet_when_dinov2_weights_are_found_and_no_resnet_is_given(
    tmp_path, monkeypatch, capsys
):
    found = tmp_path / "dinov2_vits14_pretrain.pth"
    monkeypatch.setattr(selftrain, "find_weights", lambda arch, configured: found)
    cfg = load_config("demo", "maskcut", ["backbone.arch=dinov2_vits14"])
    assert cfg.train.model == "auto"
    resolved, why = selftrain.resolve_detector(cfg)
    assert resolved.train.model == "cascade_mask_rcnn_vitdet_s14"
    assert str(found) in why and "train.model=auto" in why
    # a DINO ResNet-50 given: the R50 detector from it
    resolved, why = selftrain.resolve_detector(load_config("demo", "maskcut", ["train.init=/w/r50.pth"]))
    assert resolved.train.model == "cascade_mask_rcnn_R_50_FPN" and "ResNet-50" in why
    # random-init R50 stays available explicitly
    explicit = load_config("demo", "maskcut", ["train.model=cascade_mask_rcnn_R_50_FPN"])
    assert selftrain.resolve_detector(explicit)[1].startswith("cascade_mask_rcnn_R_50_FPN, random init")
    # no DINOv2 weights: auto falls back to the random-init R50; an explicit ViTDet stops with a message
    monkeypatch.setattr(selftrain, "find_weights", lambda arch, configured: None)
    resolved, why = selftrain.resolve_detector(cfg)
    assert resolved.train.model == "cascade_mask_rcnn_R_50_FPN" and "no DINOv2" in why
    with pytest.raises(RunError, match="dinov2_vits14"):
        selftrain.resolve_detector(load_config("demo", "maskcut", ["train.model=mask_rcnn_vitdet_s14"]))
    with pytest.raises(ConfigError, match="train.init"):
        load_config("demo", "maskcut", ["train.model=mask_rcnn_vitdet_s14", "train.init=/w/r50.pth"])


def test_a_resnet_init_that_is_not_a_checkpoint_is_one_error_naming_train_init(tmp_path):
    notes = tmp_path / "r50.pth"
    notes.write_bytes(b"a note\n")
    cfg = load_config("demo", "maskcut", [f"train.init={notes}", "train.model=cascade_mask_rcnn_R_50_FPN"])
    with pytest.raises(
        RunError, match=r"^config key 'train.init': cannot read '.*r50.pth' as a torch checkpoint"
    ):
        selftrain.initial_weights(cfg, tmp_path)
    assert not (tmp_path / "init_resnet50_d2.pth").exists()


@pytest.mark.usefixtures("ray_local")
def test_selftraining_a_vitdet_detector_end_to_end(tmp_path, monkeypatch, capsys):
    """Two rounds through the pipeline: the DINOv2 file found (here PIPELINE_WEIGHTS) is converted into
    round 0, round 1 re-labels with the ViTDet detector on Ray workers and trains with AdamW."""
    from tests.synthetic import write_image_folder

    images = tmp_path / "images"
    write_image_folder(images, 4)
    torch.save(dinov2_state(**TINY), tmp_path / "tiny_dinov2.pth")
    monkeypatch.setenv("PIPELINE_WEIGHTS", str(tmp_path / "tiny_dinov2.pth"))
    schedule = [*TINY_OPTS, *SMALL_INPUT, "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", [1], "SOLVER.WARMUP_ITERS", 1]
    cfg = load_config(
        "imagefolder",
        "maskcut",
        [f"dataset.root={images}", f"run.out_dir={tmp_path / 'runs'}", "run.workers=1",
         "backbone.arch=test_vit_tiny", "backbone.random_init=true", "method.resize=96", "train.model=auto",
         "train.rounds=2", "train.score_thresh=[0.0]", "train.detections_per_image=3",
         f"train.opts={schedule}"],
        preset="cpu-tiny",
    )  # fmt: skip
    last = selftrain.run(cfg)
    assert "detector: cascade_mask_rcnn_vitdet_s14, backbone from DINOv2 ViT-S/14" in capsys.readouterr().err
    meta = json.loads((last / "metadata.json").read_text())
    assert meta["model"] == "cascade_mask_rcnn_vitdet_s14" and "tiny_dinov2.pth" in meta["detector"]
    round0 = last.parent / "round0"  # trained from the converted DINOv2 weights, removed once it has
    assert f"WEIGHTS: {round0 / 'init_vitdet_dinov2_d2.pth'}" in (round0 / "config.yaml").read_text()
    assert not (round0 / "init_vitdet_dinov2_d2.pth").exists()
    assert json.loads((last / "relabel.json").read_text())["predictions_kept"] > 0
    assert "OPTIMIZER: ADAMW" in (last / "config.yaml").read_text()
    result = load_detector(last, device="cpu", max_detections=3)(object_image(96, 128, (20, 30, 70, 90)))
    assert result.masks.shape == (len(result.scores), 96, 128)
