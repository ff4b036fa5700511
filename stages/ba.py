"""The BA video stage: frozen ViT tokens -> spatio-temporal attention (trained correlator, or the frozen
ViT's own last-block attention) -> clusters -> object tracks with a stable identity across frames.

Memory stays bounded on long videos: attention rows exist for ``window`` query frames at a time. The
first clustering round runs on each window alone and keeps only centroids; later rounds work on the
centroids; the final assignment recomputes each window's rows (SPEC "BA", stages/ba_cluster.py).
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import BAConfig, CorrelatorConfig
from stages.ba_cluster import (
    background_cluster,
    cluster_blocks,
    instance_tracks,
)
from stages.backbone import Backbone, prepare_image
from stages.correlator import (
    TemporalCorrelator,
    dino_sparse_attention,
    iter_attention_chunks,
    load_checkpoint,
)
from stages.export import encode_mask
from stages.io import BadImage, atomic_write_bytes, atomic_write_json, load_rgb
from stages.videos import VideoRecord

Attend = Callable[[Sequence[int]], torch.Tensor]  # query frames -> (len * n, K * n) attention rows


def ba_tracks(attend: Attend, num_frames: int, grid: tuple[int, int], cfg: BAConfig) -> torch.Tensor:
    """Attention -> (T, h, w) track ids: 0 = background, 1..K = objects, each one id over all frames."""

    def windows():
        return (rows for _, rows in iter_attention_chunks(attend, num_frames, cfg.window))

    labels = cluster_blocks(
        windows, cfg.tau, cfg.max_rounds, smooth=cfg.smooth_first_round, weights=cfg.centroid_weights
    ).reshape(num_frames, *grid)
    return instance_tracks(labels, background_cluster(labels, cfg.background))


def frame_input_size(size: Sequence[int], patch: int) -> tuple[int, int]:
    """The configured [height, width], each rounded to a multiple of the patch size."""
    return tuple(max(patch, round(s / patch) * patch) for s in size)


def load_correlator(path: Path, dim: int, cfg: CorrelatorConfig, device: torch.device) -> TemporalCorrelator:
    model = TemporalCorrelator(dim, cfg.heads, cfg.mlp_ratio, cfg.clip_len, cfg.attn_drop, cfg.proj_drop)
    load_checkpoint(path, model)
    return model.to(device).eval()


class VideoDiscoverer:
    """Holds the frozen backbone and, when trained, the correlator; turns a video's frames into tracks."""

    def __init__(
        self, backbone: Backbone, correlator: TemporalCorrelator | None, cfg: BAConfig, batch_size: int
    ):
        self.backbone = backbone
        self.correlator = correlator
        self.cfg = cfg
        self.batch_size = batch_size

    def tokens(self, frames: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Per frame keys and queries (T, 1 + n, C), CLS first, at the configured size."""
        p = self.backbone.patch
        h, w = frame_input_size(self.cfg.size, p)
        x = torch.stack(
            [
                prepare_image(np.array(Image.fromarray(f).resize((w, h), Image.BICUBIC)), p, None)
                for f in frames
            ]
        )
        keys, queries = [], []
        for start in range(0, len(frames), self.batch_size):
            feats = self.backbone(x[start : start + self.batch_size], want=("keys", "queries"))
            keys.append(feats.keys)
            queries.append(feats.queries)
        return torch.cat(keys), torch.cat(queries), feats.grid

    def attention(self, keys: torch.Tensor, queries: torch.Tensor) -> Attend:
        stride = self.cfg.key_stride
        if self.correlator is not None:  # tokens = [CLS; keys] per frame, as in training
            return functools.partial(self.correlator.sparse_attention, keys, stride, self.cfg.temporal)
        heads = self.backbone.model.blocks[-1].attn.num_heads
        return functools.partial(dino_sparse_attention, queries, keys, heads, stride)

    @torch.inference_mode()
    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        """Frames (HxWx3 uint8, same size) -> (T, H, W) int track ids at the frames' size."""
        keys, queries, grid = self.tokens(frames)
        tracks = ba_tracks(self.attention(keys, queries), len(frames), grid, self.cfg).cpu().numpy()
        height, width = frames[0].shape[:2]
        return np.stack(
            [
                np.array(Image.fromarray(t.astype(np.uint8)).resize((width, height), Image.NEAREST))
                for t in tracks
            ]
        ).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Stage I/O: one video per shard


def run_video(discoverer: VideoDiscoverer, video: VideoRecord, out_path: Path, overlay: Path | None) -> dict:
    """Tracks of one video, written atomically as its shard file; an unreadable frame fails the video
    (recorded with the frame's name), not the run."""
    start = time.perf_counter()
    try:
        frames = [load_rgb(Path(video.root) / f) for f in video.frames]
    except BadImage as e:
        failure = {"video": video.name, "reason": str(e)}
        atomic_write_json(out_path, {"video": None, "tracks": [], "failures": [failure]})
        return {"frames": len(video.frames), "tracks": 0, "failures": 1}
    if len({f.shape for f in frames}) > 1:
        frames = [np.array(Image.fromarray(f).resize(frames[0].shape[1::-1])) for f in frames]
    ids = discoverer(frames)
    height, width = ids.shape[1:]
    tracks = [
        {"track_id": k, "segmentations": [encode_mask(m) if m.any() else None for m in ids == k]}
        for k in range(1, int(ids.max()) + 1)
    ]
    meta = {
        "id": video.id,
        "name": video.name,
        "file_names": list(video.frames),
        "width": width,
        "height": height,
    }
    atomic_write_json(out_path, {"video": meta, "tracks": tracks, "failures": []})
    if overlay is not None:
        write_gif(overlay, frames, ids)
    return {"frames": len(frames), "tracks": len(tracks), "seconds": time.perf_counter() - start}


def write_gif(path: Path, frames: list[np.ndarray], ids: np.ndarray, max_width: int = 480) -> None:
    """An animated GIF of the frames with each track in its own colour, for a quick look."""
    colours = np.random.default_rng(0).integers(40, 255, (int(ids.max()) + 1, 3))
    colours[0] = 0
    scale = min(1.0, max_width / frames[0].shape[1])
    size = (int(frames[0].shape[1] * scale), int(frames[0].shape[0] * scale))
    shown = []
    for frame, frame_ids in zip(frames, ids, strict=True):
        blend = np.where(frame_ids[..., None] > 0, 0.45 * frame + 0.55 * colours[frame_ids], frame)
        shown.append(Image.fromarray(blend.astype(np.uint8)).resize(size))
    out = io.BytesIO()
    shown[0].save(out, format="GIF", save_all=True, append_images=shown[1:], duration=200, loop=0)
    atomic_write_bytes(path, out.getvalue())
