"""Typed, validated configuration: loading and checking a run's settings.

The values live in YAML under ``configs/`` (``defaults.yaml``, ``methods/<name>.yaml``,
``datasets/<name>.yaml``, ``presets/<name>.yaml``), merged in that order, then ``key=value`` overrides.
The sections are typed dataclasses declared by the components that use them (``stages/``: a method its
``Config``, the backbone ``BackboneConfig``, ...); pydantic builds them from the merged YAML (types, the
method union tagged by ``method.name``, unknown keys), then each section's ``validate`` checks ranges and
cross-field rules. Every field is required, so a value missing from the YAML is an error; every error is a
ConfigError naming the full dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import typing
from pathlib import Path
from typing import Any

import pydantic
import yaml

from stages.common.paths import CONFIG_DIR
from stages.common.schema import ConfigError, fail, positive, section
from stages.data.base import DATASET_KINDS, DatasetConfig, video_kinds
from stages.detection.train import TrainConfig
from stages.discovery.base import load_methods
from stages.features.backbone import BackboneConfig
from stages.refinement.refine import REFINERS, RefineConfig
from stages.video.correlator import CorrelatorConfig
from stages.video.solv_method import SOLVModelSection

__all__ = ["CONFIG_DIR", "Config", "ConfigError", "load_config"]

METHODS = load_methods()
# The method section: the section class of the registered method named by its 'name' (``build``).
MethodConfig = Any


@section
class RunConfig:
    out_dir: str  # run directories go under here
    shard_size: int  # images per shard: the unit of work, resume and atomic writes
    workers: int  # model-holding Ray actors; 0 = one per GPU, else one per CPU core
    threads_per_worker: int  # torch threads in each CPU actor
    ray_address: str | None  # None = start Ray locally, unless RAY_ADDRESS is set
    object_store_mb: int
    overlays: int  # write PNG overlays for the first this-many images
    max_patches: int  # images whose patch grid is larger are skipped as 'huge'
    shard_retries: int  # times a shard whose worker process died is run again on another actor
    refine_processes: int  # per model worker, processes refining masks while it runs the next batch; 0: none

    def validate(self, key: str) -> None:
        for name in ("shard_size", "threads_per_worker", "object_store_mb", "max_patches"):
            positive(f"{key}.{name}", getattr(self, name))
        for name in ("workers", "overlays", "shard_retries", "refine_processes"):
            if getattr(self, name) < 0:
                fail(f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")


@section
class Config:
    dataset: DatasetConfig
    backbone: BackboneConfig
    method: MethodConfig  # the section of the registered method method.name names (see ``build``)
    refine: RefineConfig
    run: RunConfig
    train: TrainConfig
    correlator: CorrelatorConfig
    solv_model: SOLVModelSection
    seed: int = 0
    # Set by pipeline/resolve.py once weights and the other files a run reads are found; a run directory's
    # saved config.yaml is a resolved one. Not a setting: never in the YAML files nor in a run's hash.
    resolved: bool = False

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate(f.name)
        refine = getattr(self.method, "refine", None)
        if refine is not None and refine not in REFINERS:
            fail("method.refine", f"unknown refinement '{refine}' (known: {', '.join(REFINERS.names())})")
        kind = DATASET_KINDS.get(self.dataset.kind)
        if self.modality == "video" and kind.modality != "video":
            fail(
                "method.name",
                f"{self.method.name} discovers objects in videos; dataset '{self.dataset.name}' holds "
                f"images (video datasets: {', '.join(video_datasets())})",
            )

    @property
    def modality(self) -> str:
        """'image' or 'video': the modality of the configured method."""
        return METHODS.get(self.method.name).modality

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(
        self, sections: tuple[str, ...], exclude: tuple[str, ...] = (), files: dict | None = None
    ) -> str:
        """Short hash of the given top-level sections, less the excluded dotted keys (worker counts etc.);
        ``files``: fingerprints of files the run reads, hashed with them (none: the sections alone)."""
        data = {k: v for k, v in self.to_dict().items() if k in sections}
        if files:
            data["files"] = files
        for dotted in exclude:
            *parents, key = dotted.split(".")
            node = data
            for name in parents:
                node = node.get(name) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(key, None)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------------------
# Building the sections from plain data (pydantic), with errors that name the key

_MESSAGES = {
    "missing": "missing (every key needs a value in configs/*.yaml)",
}
_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")


def _children(node: Any) -> dict[str, Any]:
    """The keys under a config type and their types: a section's fields, or the fixed keys of a mapping
    such as ``dict[Family, GraphConfig]``; {} for a value."""
    if dataclasses.is_dataclass(node):
        return typing.get_type_hints(node)
    if typing.get_origin(node) is dict:
        key, value = typing.get_args(node)
        if typing.get_origin(key) is typing.Literal:
            return {str(k): value for k in typing.get_args(key)}
    return {}


def _fields_at(section_class: type, path: list[str]) -> list[str]:
    """The key names of the section at ``path`` (names below ``section_class``), [] if it is not one."""
    node: Any = section_class
    for name in path:
        node = _children(node).get(name)
        if node is None:
            return []
    return list(_children(node))


def _paths_below(section_class: type, path: list[str]) -> list[list[str]]:
    """Every key path below the section at ``path`` (nested sections' keys too), shortest first."""
    below = [[name] for name in _fields_at(section_class, path)]
    for name in list(below):
        below += [[*name, *rest] for rest in _paths_below(section_class, [*path, *name])]
    return below


def _unknown_key(section_class: type, parts: list[str], dotted: list[str]) -> str:
    """'unknown key', with the closest known name at that level when one is close, else a key of that name
    in a section below (``method.keys`` -> ``method.graph.dino.keys``) (``parts``: the path below
    ``section_class``; ``dotted``: the full key, as the error names it)."""
    known = _fields_at(section_class, parts[:-1])
    close = [[c] for c in difflib.get_close_matches(parts[-1], known, n=1, cutoff=0.6)]
    deeper = [p for p in _paths_below(section_class, parts[:-1]) if len(p) > 1 and p[-1] == parts[-1]]
    guesses = [".".join([*dotted[:-1], *p]) for p in (close or deeper)[:2]]
    return (
        f"unknown key (did you mean {' or '.join(repr(g) for g in guesses)}?)" if guesses else "unknown key"
    )


@functools.cache
def _adapter(section_class: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(section_class)


def _typed(section_class: type, data: Any, prefix: str) -> Any:
    """``section_class`` built from plain data by pydantic; ConfigError naming the first bad key."""
    try:
        return _adapter(section_class).validate_python(data)
    except pydantic.ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [prefix] if prefix else []
        for part in err["loc"]:
            if part == "[key]":  # a mapping's key that is not allowed: the key itself is the last part
                continue
            if isinstance(part, int) and loc:
                loc[-1] += f"[{part}]"
            else:
                loc.append(str(part))
        if err["type"] in _UNKNOWN:
            parts = [str(p) for p in err["loc"] if isinstance(p, str) and p != "[key]"]
            msg = _unknown_key(section_class, parts, loc)
        else:
            msg = _MESSAGES.get(err["type"], f"{err['msg']}, got {err.get('input')!r}")
        raise ConfigError(f"config key '{'.'.join(loc) or '<root>'}': {msg}") from None


def build(data: Any) -> Config:
    """Build and validate a Config from merged plain data; ConfigError naming the first bad key. The
    method section is typed by the registered method that ``method.name`` names."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    method = data.get("method")
    if not isinstance(method, dict):
        fail("method", f"expected a mapping, got {method!r}")
    if method.get("name") not in METHODS:
        fail("method.name", f"unknown method {method.get('name')!r} (known: {', '.join(METHODS.names())})")
    section = _typed(METHODS.get(method["name"]).Config, method, "method")
    cfg = _typed(Config, {**data, "method": section}, "")
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Loading: defaults.yaml <- methods/<m>.yaml <- datasets/<d>.yaml <- key=value overrides


def _read_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of ``over`` win."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> {'a': {'b': {'c': value}}}; the value is parsed as YAML (numbers, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value")
    dotted, raw = text.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"override '{text}': bad key")
    try:
        value: Any = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        hint = ' (in a make ARGS list, write maps as JSON: [{"k":1}])' if "{" in raw else ""
        raise ConfigError(f"config key '{dotted}': cannot parse '{raw}' as YAML: {problem}{hint}") from e
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def available(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def video_datasets() -> list[str]:
    """The DATASET= names (configs/datasets/) whose kind holds videos."""
    kinds = set(video_kinds())
    return [
        name for name in available("datasets") if _named_yaml("datasets", name)["dataset"]["kind"] in kinds
    ]


def _named_yaml(kind: str, name: str) -> dict[str, Any]:
    path = CONFIG_DIR / kind / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no {kind[:-1]} config '{name}' (available: {', '.join(available(kind))})")
    return _read_yaml(path)


def load_config(
    dataset: str = "demo", method: str = "maskcut", overrides: list[str] = (), preset: str | None = None
) -> Config:
    """Resolve the configuration of a run: defaults, the method and dataset files, a preset, overrides."""
    data = _read_yaml(CONFIG_DIR / "defaults.yaml")
    data = merge(data, _named_yaml("methods", method))
    data = merge(data, _named_yaml("datasets", dataset))
    if preset:
        data = merge(data, _named_yaml("presets", preset))
    for text in overrides:
        override = parse_override(text)
        _refuse_renaming(override, {"method": method, "dataset": dataset})
        data = merge(data, override)
    return build(data)


def _refuse_renaming(override: dict, chosen: dict[str, str]) -> None:
    """``method.name=x`` or ``dataset.name=x`` would keep the other file's keys under a new name: the file
    is chosen by METHOD= / DATASET= (--method / --dataset)."""
    for key, name in chosen.items():
        given = override[key].get("name") if isinstance(override.get(key), dict) else None
        if given is not None and given != name:
            raise ConfigError(
                f"config key '{key}.name': the {key} is chosen by {key.upper()}= (--{key}), "
                f"not by an override: use {key.upper()}={given}"
            )


def load_run_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    """The config a run directory was made with (its config.yaml, resolved when it was saved), with
    ``key=value`` overrides on top (e.g. run.workers=2). A key added to the project after the run was saved
    takes today's default (defaults.yaml, then the method's file). ConfigError when the directory holds no
    config."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise ConfigError(f"no such run directory: {run_dir}{_runs_beside(Path(run_dir))}")
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory: it has no config.yaml{_runs_below(Path(run_dir))}"
        )
    saved = _read_yaml(path)
    data = _read_yaml(CONFIG_DIR / "defaults.yaml")
    method = saved.get("method", {}).get("name") if isinstance(saved.get("method"), dict) else None
    if method in available("methods"):
        data = merge(data, _named_yaml("methods", method))
        _renamed_graph_keys(saved["method"], data["method"])
    data = merge(data, saved)
    for text in overrides:
        data = merge(data, parse_override(text))
    return build(data)


def _run_names(folder: Path) -> list[str]:
    return (
        sorted(p.name for p in folder.iterdir() if (p / "config.yaml").is_file()) if folder.is_dir() else []
    )


def _runs_below(folder: Path, limit: int = 5) -> str:
    """'; it holds the runs a, b, ...' for a folder of runs (e.g. runs/pseudolabels), else ''."""
    names = _run_names(folder)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"; it holds the runs {', '.join(names[:limit])}{more}" if names else ""


def _runs_beside(missing: Path) -> str:
    """'; did you mean ...?' (the closest names) or the runs of the missing directory's folder, else ''."""
    names = _run_names(missing.parent)
    close = difflib.get_close_matches(missing.name, names, n=3, cutoff=0.6)
    if close:
        return f"; did you mean {' or '.join(repr(str(missing.parent / n)) for n in close)}?"
    return _runs_below(missing.parent).replace("; it holds", f"; {missing.parent} holds", 1)


def _renamed_graph_keys(saved: dict, today: dict) -> None:
    """A run saved before graph methods took a key treatment has ``graph.<family>.center_keys`` (bool)
    where today's method file has ``graph.<family>.keys``: the same setting, renamed in place (true ->
    'centered', false -> 'raw'). Methods whose file still has ``center_keys`` (ssl-vos) keep it."""
    for family, graph in (saved.get("graph") or {}).items():
        current = (today.get("graph") or {}).get(family) or {}
        if isinstance(graph, dict) and "center_keys" in graph and "keys" in current and "keys" not in graph:
            graph["keys"] = "centered" if graph.pop("center_keys") else "raw"


def save_config(cfg: Config, path: Path) -> None:
    from stages.common.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace with dotted keys: replace(cfg, **{'backbone.arch': 'x'})."""
    nested: dict[str, dict[str, Any]] = {}
    direct = {}
    for dotted, value in changes.items():
        head, _, rest = dotted.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **direct)
