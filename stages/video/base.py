"""What a video discovery method is: a ``DiscoveryMethod`` (``stages/discovery/base.py``, same ``METHODS``
registry) of modality "video", built once per worker with the backbone, called per video."""

from __future__ import annotations

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

    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError
