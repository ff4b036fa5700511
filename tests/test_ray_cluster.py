"""Ray without a shared file system: a pseudo-label run on a real two-node Ray cluster on this machine, where
every Python process of the cluster records the files it opens (a ``sys.addaudithook`` installed through a
``sitecustomize`` on the cluster's PYTHONPATH, not the driver's). The workers must read the images and
nothing else of the run, and never touch the run directory: only the driver writes it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from pycocotools.coco import COCO

from tests.synthetic import write_image_folder

AUDIT_HOOK = textwrap.dedent(
    """
    import os
    import sys

    if os.environ.get("AUDIT_DIR"):
        _name = f"{os.environ['AUDIT_NODE']}-{os.getpid()}.tsv"
        _log = open(os.path.join(os.environ["AUDIT_DIR"], _name), "a", buffering=1)

        def _record(event, args):
            if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
                path, mode, flags = args
                writes = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                writes = writes or any(c in (mode or "") for c in "wax+")
                _log.write(f"{'write' if writes else 'read'}\\t{os.fsdecode(path)}\\n")
            elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.truncate"):
                _log.write(f"write\\t{os.fsdecode(args[0])}\\n")

        sys.addaudithook(_record)
    """
)


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    """A head and a second node, one CPU each; their processes log every file they open under tmp/audit."""
    from ray.cluster_utils import Cluster

    site, audit = tmp_path / "site", tmp_path / "audit"
    site.mkdir()
    audit.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT_HOOK)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("AUDIT_DIR", str(audit))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    small = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    monkeypatch.setenv("AUDIT_NODE", "head")  # each node's processes inherit the environment it starts with
    cluster = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    monkeypatch.setenv("AUDIT_NODE", "second")
    cluster.add_node(**small)
    yield cluster.address, audit
    cluster.shutdown()


def test_only_the_driver_writes_the_run_directory_on_a_two_node_cluster(two_nodes, tmp_path):
    address, audit = two_nodes
    images, out = tmp_path / "images", tmp_path / "runs"
    names = write_image_folder(images, 6)
    driver_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AUDIT_DIR", "AUDIT_NODE")}
    args = [
        f"dataset.root={images}",
        f"run.out_dir={out}",
        f"run.ray_address={address}",
        "run.workers=2",  # one actor per node (one CPU each)
        "run.shard_size=2",
        "backbone.arch=test_vit_tiny",
        "backbone.random_init=true",
        "method.resize=96",
    ]
    command = [sys.executable, "-m", "pipeline", "pseudolabels", "--dataset", "imagefolder", "--method"]
    done = subprocess.run(
        [*command, "maskcut", *args], env=driver_env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (out / "pseudolabels").iterdir()
    labels = COCO(str(run_dir / "pseudolabels.json"))
    assert len(labels.getImgIds()) == 6 and labels.getAnnIds()
    assert len(list((run_dir / "overlays").glob("*.png"))) == 6  # drawn by workers, written by the driver
    assert json.loads((run_dir / "summary.json").read_text())["labelled"] == 6

    seen = {"head": {}, "second": {}}  # node -> path -> read / write, for files under this test's directory
    for log in audit.glob("*.tsv"):
        node = log.name.split("-")[0]
        for line in log.read_text().splitlines():
            kind, path = line.split("\t")
            if path.startswith(str(tmp_path)) and not path.startswith(str(audit)):
                seen[node][path] = "write" if kind == "write" or seen[node].get(path) == "write" else kind
    touched = {path: kind for node in seen.values() for path, kind in node.items()}
    assert not [p for p in touched if p.startswith(str(out))], "a cluster process touched the run directory"
    assert touched == {str(images / name): "read" for name in names}  # the images, read, and nothing else
    assert seen["head"] and seen["second"]  # both nodes did some of the work
