"""``python -m tools.bench solv``: SOLV training steps/s and inference frames/s on a fixed synthetic
workload at the paper's sizes (YTVIS19, supplementary B.2-B.3): DINOv2 ViT-B/14 features (768-d) of
336x504 frames (24x36 = 864 patches), windows of 5 frames, 8 slots of 128, half the tokens dropped in
training, merging on. Features are random and precomputed, so the frozen ViT is not timed (its cost is
in the ``stages`` section). Batch: the paper's 48 clips per step on a GPU (it trained on 2 GPUs, 24 each);
2 on a CPU, where 48 would take minutes per step.
"""

from __future__ import annotations

import time

import torch

from stages.video.solv import SOLV, SOLVConfig, video_slots, video_tracks
from stages.video.solv_train import FeatureBatch, SOLVTrainConfig, SOLVTrainer

GRID = (24, 36)  # 336x504 frames, patch 14
DIM = 768  # ViT-B
FRAME_SIZE = (336, 504)
VIDEO_FRAMES = 24
MODEL = SOLVConfig(  # the paper's YTVIS19 model (B.2-B.3); merge_min_slots from the public code
    num_slots=8,
    slot_dim=128,
    slot_iters=3,
    context=2,
    temporal_layers=3,
    temporal_heads=8,
    temporal_dropout=0.1,
    decoder_hidden=1024,
    decoder_layers=5,
    scale_factor=5.0,
    token_drop=0.5,
    merge_slots=True,
    merge_threshold=0.12,
    merge_min_slots=3,
)
SCHEDULE = SOLVTrainConfig(  # merge_periods=1: every clip is clustered, the slower case
    steps=300_000,
    lr=4e-4,
    warmup_fraction=0.05,
    final_lr_fraction=0.125,
    weight_decay=0.0,
    grad_clip=1.0,
    merge_periods=1,
    seed=0,
)


def _best_seconds(fn, reps: int) -> float:
    """Shortest wall time of ``reps`` calls after one warm-up call (GPU work waited for)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> list[str]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = 48 if device.type == "cuda" else 2
    torch.manual_seed(0)
    model = SOLV(MODEL, DIM, GRID).to(device)
    trainer = SOLVTrainer(model, SCHEDULE)
    gen = torch.Generator().manual_seed(0)
    clips = FeatureBatch(
        torch.randn(batch, MODEL.window, GRID[0] * GRID[1], DIM, generator=gen).to(device),
        torch.ones(batch, MODEL.window, dtype=torch.bool, device=device),
    )
    train_s = _best_seconds(lambda: trainer.train_step(clips), 3)
    video = torch.randn(VIDEO_FRAMES, GRID[0] * GRID[1], DIM, generator=gen).to(device)
    windows_per_batch = batch if device.type == "cuda" else 8

    def infer():
        video_tracks(video_slots(model, video, windows_per_batch), GRID, FRAME_SIZE, "border")

    infer_s = _best_seconds(infer, 2)
    params = sum(p.numel() for p in model.parameters())
    return [
        f"SOLV at the paper's size ({params / 1e6:.1f} M parameters; 768-d features, 24x36 patches, "
        f"5-frame windows, 8 slots, token drop 0.5, merging on), {device.type}:",
        f"training, batch {batch}: {1 / train_s:.3g} steps/s ({batch / train_s:.3g} clips/s, "
        f"{train_s:.3g} s/step)",
        f"inference, a {VIDEO_FRAMES}-frame video ({windows_per_batch} windows per pass, masks upsampled "
        f"to {FRAME_SIZE[0]}x{FRAME_SIZE[1]}, tracks matched): {VIDEO_FRAMES / infer_s:.3g} frames/s",
    ]


if __name__ == "__main__":
    print(*main(), sep="\n")
