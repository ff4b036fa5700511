"""What a video discovery method is: a ``DiscoveryMethod`` (``stages/discovery/base.py``, same ``METHODS``
registry) of modality "video", built once per worker with the backbone, called per video."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from stages.discovery.base import DiscoveryMethod
from stages.features.backbone import Backbone


class VideoMethod(DiscoveryMethod):
    """Frames of one video -> (T, H, W) int64 object ids at the frames' size, 0 = background, each object
    one id over all frames (its track)."""

    modality = "video"
    # Other config sections it is built with besides its own (e.g. BA's "correlator"), by name.
    uses: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(
        cls, cfg: Any, backbone: Backbone, sections: dict[str, Any], batch_size: int
    ) -> VideoMethod:
        """Build the method once per worker. ``sections``: the resolved config sections named in ``uses``
        (weights already found: the worker reads only the files they name)."""
        raise NotImplementedError

    @classmethod
    def describe(cls, sections: dict[str, Any]) -> str:
        """What the run's messages say about the method's resources (e.g. ', correlator <file>')."""
        return ""

    @classmethod
    def pair_cache(cls, cfg: Any) -> PairCache | None:
        """The per-frame-pair work this method needs cached before it runs (``PairCache``); None: none."""
        return None

    def __call__(self, frames: list[np.ndarray], pairs: Sequence[str] = ()) -> np.ndarray:
        """``pairs``: with a ``pair_cache``, the paths of the video's T-1 pair files, in frame order."""
        raise NotImplementedError


class PairCache:
    """Work a video method needs on every pair of consecutive frames (ssl-vos: optical flow), done once per
    run by a stage of its own (``pipeline/pseudolabels.py``): its workers return one file per pair, the
    driver writes it under ``folder`` in the run directory, and the method gets the files' paths. A picklable
    description; ``worker`` builds the function inside each worker."""

    @property
    def folder(self) -> str:
        """The pair files' folder, relative to the run directory (named by what shapes them)."""
        raise NotImplementedError

    def worker(self, device: str) -> Callable[[np.ndarray, np.ndarray], bytes]:
        """(frame p, frame p+1) HxWx3 uint8 RGB -> the pair's file content."""
        raise NotImplementedError
