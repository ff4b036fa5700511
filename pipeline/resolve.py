"""Resolving a config once, at the entry point: concrete backbone weights, and the files of the sections a
video method uses (BA's trained correlator, SOLV's trained model) or of an image method's trained model
(FOUND's head), so that stages and workers get settings that name every file they read. Idempotent:
resolving a resolved config changes nothing."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import METHODS, Config, replace
from pipeline.runs import resolve_backbone
from pipeline.train_correlator import resolve_correlator
from pipeline.train_found import resolve_found_head
from pipeline.train_solv import resolve_solv_model

# Config sections a method may use (VideoMethod.uses) and trained models it may discover with
# (ImageMethod.trained) -> how their files are found (sections that name no file, such as 'refine', need
# none).
SECTION_RESOLVERS: dict[str, Callable[[Config], Config]] = {
    "correlator": resolve_correlator,
    "solv_model": resolve_solv_model,
    "found_head": resolve_found_head,
}


def resolve(cfg: Config) -> Config:
    """``cfg`` with backbone.arch/weights fixed (``resolve_backbone``) and every section its method uses
    resolved. Raises WeightsError or RunError naming a missing file. A resolved config is returned as is."""
    if cfg.resolved:
        return cfg
    cfg = resolve_backbone(cfg)
    method = METHODS.get(cfg.method.name)
    for name in (*getattr(method, "uses", ()), *getattr(method, "trained", ())):
        if name in SECTION_RESOLVERS:
            cfg = SECTION_RESOLVERS[name](cfg)
    return replace(cfg, resolved=True)


def method_sections(cfg: Config) -> dict:
    """The resolved sections a video method is built with, by name (``VideoMethod.uses``)."""
    return {name: getattr(cfg, name) for name in getattr(METHODS.get(cfg.method.name), "uses", ())}
