"""Configs: every value from YAML, unknown keys and bad values fail naming the key."""

import pytest

from pipeline.config import ConfigError, load_config, parse_override


def test_defaults_match_the_spec():
    maskcut = load_config("demo", "maskcut").method
    assert (maskcut.graph["dino"].tau, maskcut.eps, maskcut.n_masks, maskcut.resize) == (0.15, 1e-5, 3, 480)
    assert maskcut.reference_backbone == "dino_vitb8" and maskcut.refine == "crf"
    tokencut = load_config("demo", "tokencut").method
    assert (tokencut.graph["dino"].tau, tokencut.resize, tokencut.reference_backbone) == (
        0.2,
        None,
        "dino_vits16",
    )
    assert load_config("demo", "lost").method.k == 100
    refine = load_config().refine
    assert (refine.min_iou, refine.crf.iters, refine.crf.gauss_sxy, refine.crf.bilateral_srgb) == (
        0.5,
        10,
        3,
        5,
    )
    assert (refine.bilateral.sigma_spatial, refine.bilateral.lam, refine.bilateral.cg_maxiter) == (
        16,
        256,
        25,
    )


def test_overrides_are_typed():
    cfg = load_config(
        "demo", "maskcut", ["method.n_masks=2", "run.ray_address=null", "method.graph.dino.tau=0.3"]
    )
    assert cfg.method.n_masks == 2 and cfg.run.ray_address is None and cfg.method.graph["dino"].tau == 0.3


@pytest.mark.parametrize(
    "override, key",
    [
        ("run.shard_sise=3", "run.shard_sise"),
        ("method.k=5", "method.k"),  # a LOST key on MaskCut
        ("method.n_masks=0", "method.n_masks"),
        ("method.refine=blur", "method.refine"),
        ("backbone.batch_size=two", "backbone.batch_size"),
        ("backbone.arch=vit_giant", "backbone.arch"),
        ("backbone.precision=float16", "backbone.precision"),
        ("refine.bilateral.confidence=1.5", "refine.bilateral.confidence"),
        ("method.graph.dino=null", "method.graph.dino"),
        ("run.shard_retries=-1", "run.shard_retries"),
    ],
)
def test_bad_configs_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("demo", "maskcut", [override])


@pytest.mark.parametrize(
    "method, override, key",
    [
        ("maskcut", "method.graph.dinov2.keys=whitened", "method.graph.dinov2.keys"),
        ("tokencut", "method.graph.dino.keys=true", "method.graph.dino.keys"),
        ("lost", "method.keys.dinov2=centred", "method.keys.dinov2"),
        ("lost", "method.keys.dinov3=raw", "method.keys.dinov3"),
        ("maskcut", "method.graph.dino.center_keys=true", "method.graph.dino.center_keys"),  # the old boolean
        ("maskcut", "method.graph.dinov3.keys=raw", "method.graph.dinov3"),  # not a backbone family
        ("votecut", "method.sources.dinov3=[]", "method.sources.dinov3"),
    ],
)
def test_bad_key_treatments_fail_naming_the_key(method, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("demo", method, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.n_mask=2", "config key 'method.n_mask': unknown key (did you mean 'method.n_masks'?)"),
        ("methd.n_masks=2", "config key 'methd': unknown key (did you mean 'method'?)"),
        ("refine.crf.iter=3", "config key 'refine.crf.iter': unknown key (did you mean 'refine.crf.iters'?)"),
        ("run.shard_sise=3", "config key 'run.shard_sise': unknown key (did you mean 'run.shard_size'?)"),
        ("run.zzz=3", "config key 'run.zzz': unknown key"),  # nothing close: no guess
        # no close name at that level: the keys of that name in the sections below it
        (
            "method.keys.dinov2=raw",
            "config key 'method.keys': unknown key (did you mean 'method.graph.dino.keys' or "
            "'method.graph.dinov2.keys'?)",
        ),
        (
            "method.graph.dinov2.key=raw",
            "config key 'method.graph.dinov2.key': unknown key (did you mean 'method.graph.dinov2.keys'?)",
        ),
    ],
)
def test_an_unknown_key_is_named_with_the_closest_known_one(override, message):
    with pytest.raises(ConfigError) as error:
        load_config("demo", "maskcut", [override])
    assert str(error.value) == message


def test_unknown_dataset_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="available: .*voc07"):
        load_config("voc2099", "maskcut")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("run.workers")
    with pytest.raises(ConfigError, match=r"config key 'method.tau': cannot parse '\[1' as YAML"):
        parse_override("method.tau=[1")
    # what make's ARGS makes of a YAML flow map (split at spaces): one error line that says how to write it
    with pytest.raises(ConfigError, match="method.sources.dinov2.*write maps as JSON"):
        parse_override("method.sources.dinov2=[{keys:")
    with pytest.raises(ConfigError, match="dataset.root"):
        load_config("imagefolder", "maskcut")


def test_digest_ignores_execution_settings_only():
    from pipeline.runs import EXECUTION_KEYS, stage_sections

    def digest(cfg, stage="pseudolabels"):
        return cfg.digest(stage_sections(cfg, stage), EXECUTION_KEYS)

    base = load_config()
    same = load_config(
        overrides=[
            "run.workers=7",
            "run.shard_retries=0",
            "backbone.device=cpu",
            "train.merge_iou=0.4",
            "correlator.lr=1",
        ]
    )
    other = load_config(overrides=["method.n_masks=2"])
    assert digest(base) == digest(same) != digest(other)  # training settings don't touch pseudo-labels
    assert digest(base, "selftrain") != digest(same, "selftrain")
    assert digest(base, "selftrain") == digest(load_config(overrides=["train.rounds=5"]), "selftrain")


def test_a_video_method_on_images_names_the_video_datasets_to_use_instead():
    with pytest.raises(ConfigError) as error:
        load_config("imagefolder", "ba", ["dataset.root=/tmp/mine"])
    assert str(error.value).startswith(
        "config key 'method.name': ba discovers objects in videos; dataset 'imagefolder' holds images "
        "(video datasets: davis17, davis2016, demo-video, "
    )
    assert "videofolder" in str(error.value) and "framefolders" not in str(error.value)  # names, not kinds


def test_a_missing_root_says_how_to_get_it():
    from stages.data.base import missing_root_hint

    assert missing_root_hint("data/demo/images") == " (run `make demo-data`)"
    assert missing_root_hint("data/demo-video") == " (run `make demo-data`)"
    assert missing_root_hint("data/photos/images") == " (run `make photos-data`)"
    for given in ("/tmp/mine", "data/DAVIS", "demo/images"):  # DATA= or a set users bring: the path is theirs
        assert missing_root_hint(given) == " (give its path: DATA=/path or dataset.root=...)"


@pytest.mark.parametrize(
    "opts, refused",
    [
        ("train.opts=[SOLVER.MAX_ITR,5]", "Non-existent key: SOLVER.MAX_ITR (did you mean SOLVER.MAX_ITER?)"),
        ("train.opts=[SOLVER.MAX_ITER,five]", "Type mismatch"),
    ],
)
def test_a_detectron2_option_it_refuses_is_a_user_error_before_any_work(tmp_path, capsys, opts, refused):
    from pipeline.cli import main

    args = ["selftrain", "--dataset", "demo", f"run.out_dir={tmp_path}", opts]
    assert main(args) == 2
    *notes, err = capsys.readouterr().err.splitlines()  # notes: which backbone weights were found
    assert err.startswith("error: config key 'train.opts' or 'train.schedule': detectron2 refuses it: ")
    assert refused in err and all(n.startswith("note: ") for n in notes)
    assert not any(tmp_path.iterdir())  # nothing was run


def test_cuda_asked_for_on_a_machine_without_it_is_a_user_error_naming_the_key(monkeypatch):
    import torch

    from stages.features.backbone import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^config key 'backbone.device': cuda, but CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_the_method_and_dataset_are_chosen_by_their_options_not_by_a_name_override():
    with pytest.raises(ConfigError) as error:
        load_config("demo", "maskcut", ["method.name=tokencut"])  # was: "'method.n_masks': unknown key"
    assert str(error.value) == (
        "config key 'method.name': the method is chosen by METHOD= (--method), not by an override: "
        "use METHOD=tokencut"
    )
    with pytest.raises(ConfigError, match=r"^config key 'dataset.name': .* use DATASET=voc07$"):
        load_config("demo", "maskcut", ["dataset.name=voc07"])
    assert load_config("demo", "maskcut", ["method.name=maskcut"]).method.name == "maskcut"  # the same: fine
