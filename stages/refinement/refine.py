"""Mask refinement: snap coarse (patch-level) masks to image edges with a dense CRF or the bilateral solver.

A refinement that changes the mask too much is rejected (SPEC "Refinement"): the caller writes nothing.
Each refiner has its reference implementation (pydensecrf, scipy) and, for the CRF and the bilateral solver,
a torch one (``dense_crf_torch.py``, ``bilateral_solver_torch.py``) that runs on the device it is given;
``refine.backend`` picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import ndimage

from stages.common.masks import mask_iou
from stages.common.registry import Registry
from stages.common.schema import fail, positive, section
from stages.refinement import bilateral_solver_torch, dense_crf_torch
from stages.refinement.bilateral_solver import BilateralConfig, bilateral_solve


@section
class CrfConfig:
    iters: int  # mean-field iterations
    gauss_sxy: float
    gauss_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float

    def validate(self, key: str) -> None:
        for name in ("iters", "gauss_sxy", "bilateral_sxy", "bilateral_srgb"):
            positive(f"{key}.{name}", getattr(self, name))


@section
class RefineConfig:
    min_iou: float  # reject a refined mask whose IoU with the raw mask is below this
    # auto: torch on a CUDA device; on a CPU the faster of the two for the image's mask count (torch_from)
    backend: Literal["auto", "reference", "torch"]
    crf: CrfConfig
    bilateral: BilateralConfig

    def validate(self, key: str) -> None:
        if not 0 <= self.min_iou <= 1:
            fail(f"{key}.min_iou", f"must be in [0, 1], got {self.min_iou}")
        self.crf.validate(f"{key}.crf")
        self.bilateral.validate(f"{key}.bilateral")


@dataclass(frozen=True)
class Refiner:
    """A registered refinement.

    ``reference``: (HxWx3 uint8 RGB, HxW bool coarse mask, RefineConfig) -> HxW bool refined mask (numpy).
    ``torch``: (HxWx3 uint8 tensor, (B, H, W) bool masks, RefineConfig) -> (B, H, W) bool, on the inputs'
    device; None when the refiner has no torch version (then the reference runs whatever the backend).
    ``cpu_torch_from``: with ``refine.backend=auto`` on a CPU, the torch version refines an image with at
    least this many masks (it builds its lattice or grid once per image and shares it among the masks, so it
    overtakes the reference from some count on, README "Performance"); None: never on a CPU.
    """

    reference: Callable[[np.ndarray, np.ndarray, RefineConfig], np.ndarray]
    torch: Callable[[torch.Tensor, torch.Tensor, RefineConfig], torch.Tensor] | None = None
    cpu_torch_from: int | None = None


# name -> Refiner. A method's config names one (``method.refine``).
REFINERS: Registry[Refiner] = Registry("refinement")


def _check_inputs(image: np.ndarray, mask: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"mask must be a HxW bool array, got shape {mask.shape} dtype {mask.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask size {mask.shape} differs from image size {image.shape[:2]}")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (an empty mask stays empty)."""
    labels, count = ndimage.label(mask)  # default structure in 2D = 4-connectivity
    if count == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (np.argmax(sizes) + 1)


# cpu_torch_from (refine.backend=auto on a CPU), measured on demo photos at MaskCut's 480x480 (README
# "Performance"): the torch CRF was faster at every mask count, in 1 and 2 threads; the torch bilateral
# solver only from 2 masks in 2 threads (one mask: 71 against 62 ms), so TokenCut keeps scipy.
REFINERS.register("crf")(
    Refiner(
        reference=lambda image, mask, cfg: crf_refine(image, mask, cfg.crf),
        torch=lambda image, masks, cfg: dense_crf_torch.crf_refine(image, masks, cfg.crf),
        cpu_torch_from=1,
    )
)
REFINERS.register("bilateral")(
    Refiner(
        reference=lambda image, mask, cfg: bilateral_refine(image, mask, cfg.bilateral),
        torch=lambda image, masks, cfg: bilateral_solver_torch.bilateral_refine(image, masks, cfg.bilateral),
        cpu_torch_from=2,
    )
)
REFINERS.register("none")(Refiner(reference=lambda image, mask, cfg: mask))


def torch_from(backend: str, device: str | torch.device, refiner: Refiner) -> int | None:
    """From how many masks per image ``backend`` refines with ``refiner``'s torch version on ``device``;
    None: never (the reference always).

    'auto' is torch on CUDA (where the references, single-threaded on the CPU, would keep the GPU waiting)
    and, on a CPU, torch from ``refiner.cpu_torch_from`` masks on, where it is the faster of the two.
    """
    if refiner.torch is None or backend == "reference":
        return None
    if backend == "torch" or torch.device(device).type == "cuda":
        return 1
    return refiner.cpu_torch_from


def refine_backend(backend: str, device: str | torch.device, refiner: Refiner, masks: int = 1) -> str:
    """The implementation (``'torch'`` or ``'reference'``) that ``backend`` picks on ``device`` for an image
    with ``masks`` masks (``torch_from``)."""
    first = torch_from(backend, device, refiner)
    return "torch" if first is not None and masks >= first else "reference"


def crf_refine(image: np.ndarray, mask: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """Dense-CRF refinement of a binary mask.

    Args:
        image: HxWx3 uint8 RGB.
        mask: HxW bool coarse mask.
        cfg: mean-field iterations and the Gaussian / bilateral pairwise parameters.
    Returns:
        HxW bool MAP labelling with holes filled.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    _check_inputs(image, mask)
    h, w = mask.shape
    # As in MaskCut, the mask gives the logits {bg: 1 - m, fg: m} and their softmax the probabilities
    # (0.73 for the mask's label): a deliberately weak unary, so the pairwise terms can move the boundary.
    # Using the 0/1 mask as probabilities instead would pin every pixel (unary ~11.5 after clipping).
    fg = mask.astype(np.float32)
    logits = np.stack([1.0 - fg, fg])
    probs = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    unary = unary_from_softmax(probs)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=cfg.gauss_sxy, compat=cfg.gauss_compat)
    crf.addPairwiseBilateral(
        sxy=cfg.bilateral_sxy,
        srgb=cfg.bilateral_srgb,
        rgbim=np.require(image, requirements=["C", "W"]),  # pydensecrf needs a writable buffer
        compat=cfg.bilateral_compat,
    )
    q = np.asarray(crf.inference(cfg.iters)).reshape(2, h, w)
    return ndimage.binary_fill_holes(q.argmax(axis=0) == 1)


def bilateral_refine(image: np.ndarray, mask: np.ndarray, cfg: BilateralConfig) -> np.ndarray:
    """Bilateral-solver refinement of a binary mask (TokenCut's variant).

    Args:
        image: HxWx3 uint8 RGB.
        mask: HxW bool coarse mask.
        cfg: solver parameters; ``cfg.confidence`` is the (uniform) confidence of every mask pixel.
    Returns:
        HxW bool: solution > 0.5, holes filled, largest 4-connected component only.
    """
    _check_inputs(image, mask)
    confidence = np.full(mask.shape, cfg.confidence)
    solved = bilateral_solve(image, mask.astype(np.float64), confidence, cfg)
    return largest_component(ndimage.binary_fill_holes(solved > 0.5))


def refine_masks(
    image: np.ndarray,
    masks: list[np.ndarray],
    method: str,
    cfg: RefineConfig,
    device: str | torch.device = "cpu",
) -> list[np.ndarray | None]:
    """Refine coarse masks of one image with the refiner registered as ``method`` (REFINERS: 'crf',
    'bilateral', 'none'), by the implementation ``cfg.backend`` picks on ``device`` (``refine_backend``).

    Args:
        image: HxWx3 uint8 RGB.
        masks: HxW bool coarse masks.
    Returns:
        per mask: the refined HxW bool mask, the input unchanged for 'none', or None when the refinement is
        rejected because IoU(raw, refined) < ``cfg.min_iou``. The torch version refines the image's masks
        as one batch (its lattices or grid built once).
    Raises:
        ConfigError for an unknown refiner; ValueError for inputs of the wrong shape or type.
    """
    refiner = REFINERS.get(method)
    for mask in masks:
        _check_inputs(image, mask)
    if not masks:
        return []
    if refine_backend(cfg.backend, device, refiner, len(masks)) == "torch":
        batch = torch.from_numpy(np.stack(masks)).to(device)
        refined = list(refiner.torch(torch.from_numpy(image).to(device), batch, cfg).cpu().numpy())
    else:
        refined = [refiner.reference(image, mask, cfg) for mask in masks]
    # 'none' returns its input: nothing was changed, so there is nothing to reject.
    return [
        new if new is old or mask_iou(old, new) >= cfg.min_iou else None
        for old, new in zip(masks, refined, strict=True)
    ]


def refine_mask(
    image: np.ndarray, mask: np.ndarray, method: str, cfg: RefineConfig, device: str | torch.device = "cpu"
) -> np.ndarray | None:
    """``refine_masks`` of one mask: the refined HxW bool mask, the input for 'none', or None if rejected."""
    return refine_masks(image, [mask], method, cfg, device)[0]
