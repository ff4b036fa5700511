"""Fast bilateral solver (Barron & Poole, "The Fast Bilateral Solver", ECCV 2016) in torch, on the device of
its inputs; the same problem, grid and iterations as the scipy reference
``stages.refinement.bilateral_solver``.

    minimise  lam/2 * sum_ij W_ij (x_i - x_j)^2  +  sum_i c_i (x_i - t_i)^2

W is splat / blur / slice on a bilateral grid in (x, y, luma, u, v) with one vertex per occupied cell: splat
and slice are scatter and gather by each pixel's vertex, the blur adds the +-1 neighbours along each of the
5 axes to 2*5 times the vertex itself. The blur is bistochastized, and the problem, reduced to the vertices,
is solved by conjugate gradients with a Jacobi preconditioner, in float64 like the reference. Several targets
of one image are solved together (one column each), each stopping when its own residual is small enough.
"""

from __future__ import annotations

from typing import Protocol

import torch

from stages.refinement.connected_components_torch import fill_holes, largest_component

# ITU-R BT.601 RGB -> YUV (Y in [0, 255], U and V centred on 0), as in the reference.
_RGB_TO_YUV = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
# As in the reference: Sinkhorn-style normalisation steps, and the floor of the preconditioner's diagonal.
_BISTOCHASTIC_ITERS = 10
_MIN_DIAGONAL = 1e-5


class SolverParameters(Protocol):
    """The solver's settings (``refine.bilateral`` in configs/defaults.yaml, SPEC "Refinement")."""

    sigma_spatial: float
    sigma_luma: float
    sigma_chroma: float
    lam: float
    confidence: float
    cg_tol: float
    cg_maxiter: int


class BilateralGrid:
    """Splat / blur / slice of one image's bilateral grid.

    Attributes: ``pixel_to_vertex`` (N,) vertex of every pixel (row-major), ``n_vertices``, ``mass``
    (n_vertices,) float64 pixel count of each vertex, ``pairs`` (2, P) vertex pairs one step apart along
    one axis, each pair once.
    """

    def __init__(self, image: torch.Tensor, params: SolverParameters):
        coords = _grid_coordinates(image, params)
        # One free slot below and above every coordinate, so a +-1 neighbour never aliases through the code.
        coords = coords - (coords.amin(0) - 1)
        extent = (coords.amax(0) + 2).tolist()
        strides = [1]
        for e in extent[:-1]:
            strides.append(strides[-1] * e)
        codes = (coords * torch.tensor(strides, device=coords.device)).sum(1)
        vertex_codes, self.pixel_to_vertex = torch.unique(codes, sorted=True, return_inverse=True)
        self.n_vertices = n = len(vertex_codes)
        self.dims = len(strides)
        self.mass = torch.bincount(self.pixel_to_vertex, minlength=n).double()
        pairs = []
        for stride in strides:
            wanted = vertex_codes + stride
            found = torch.searchsorted(vertex_codes, wanted).clamp_(max=n - 1)
            ok = vertex_codes[found] == wanted
            pairs.append(torch.stack([torch.nonzero(ok)[:, 0], found[ok]]))
        self.pairs = torch.cat(pairs, 1)

    def splat(self, values: torch.Tensor) -> torch.Tensor:
        """(B, N) pixel values -> (B, n_vertices) float64 sums per vertex."""
        out = torch.zeros(values.shape[0], self.n_vertices, dtype=torch.float64, device=values.device)
        return out.index_add_(1, self.pixel_to_vertex, values.double())

    def blur(self, values: torch.Tensor) -> torch.Tensor:
        """(B, n_vertices) -> (B, n_vertices): 2*dims times each vertex plus its one-step neighbours."""
        rows, cols = self.pairs
        out = values * (2 * self.dims)
        out.index_add_(1, rows, values.index_select(1, cols))
        return out.index_add_(1, cols, values.index_select(1, rows))

    def slice(self, values: torch.Tensor) -> torch.Tensor:
        """(B, n_vertices) -> (B, N): every pixel takes its vertex's value."""
        return values.index_select(1, self.pixel_to_vertex)


def _grid_coordinates(image: torch.Tensor, params: SolverParameters) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (H*W, 5) int64 grid cells (x, y, luma, u, v), each coordinate / its sigma."""
    h, w, _ = image.shape
    dev = image.device
    yuv = image.reshape(-1, 3).double() @ torch.tensor(_RGB_TO_YUV, dtype=torch.float64, device=dev).T
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64, device=dev),
        torch.arange(w, dtype=torch.float64, device=dev),
        indexing="ij",
    )
    sigmas = torch.tensor(
        [params.sigma_spatial] * 2 + [params.sigma_luma] + [params.sigma_chroma] * 2,
        dtype=torch.float64,
        device=dev,
    )
    scaled = torch.cat([xs.reshape(-1, 1), ys.reshape(-1, 1), yuv], 1) / sigmas
    return torch.round(scaled).long()  # half to even, as np.rint


def _bistochastize(grid: BilateralGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertex scalings (m, n), each (n_vertices,) float64, with diag(n) B diag(n) 1 ~= m = vertex masses:
    the rescaling that makes the blur doubly stochastic (Barron & Poole, section 3)."""
    n = torch.ones(1, grid.n_vertices, dtype=torch.float64, device=grid.mass.device)
    for _ in range(_BISTOCHASTIC_ITERS):
        n = torch.sqrt(n * grid.mass / grid.blur(n))
    return (n * grid.blur(n))[0], n[0]


def _preconditioned_cg(
    apply_a, b: torch.Tensor, x0: torch.Tensor, inv_diagonal: torch.Tensor, rtol: float, maxiter: int
) -> torch.Tensor:
    """Jacobi-preconditioned conjugate gradients on the columns of (B, n) ``b`` at once, step for step as
    scipy.sparse.linalg.cg: a column stops (keeps its x) once its residual norm is below rtol * |b|, and a
    column with b = 0 returns b."""
    x = x0
    r = b - apply_a(x)
    atol = rtol * torch.linalg.vector_norm(b, dim=1)
    p = torch.zeros_like(b)
    rho_prev = torch.ones(b.shape[0], dtype=b.dtype, device=b.device)
    for it in range(maxiter):
        active = (torch.linalg.vector_norm(r, dim=1) >= atol) & (atol > 0)  # b = 0: nothing to solve
        if not bool(active.any()):
            break
        z = inv_diagonal * r
        rho = (r * z).sum(1)
        p = z if it == 0 else z + (rho / rho_prev)[:, None] * p
        q = apply_a(p)
        alpha = (rho / (p * q).sum(1))[:, None]
        # A finished column keeps x and r as they are (its p may be anything, even NaN, from here on).
        x = torch.where(active[:, None], x + alpha * p, x)
        r = torch.where(active[:, None], r - alpha * q, r)
        rho_prev = rho
    return torch.where((atol == 0)[:, None], b, x)


def bilateral_solve(
    image: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor, params: SolverParameters
) -> torch.Tensor:
    """Edge-aware smoothing of one or several targets guided by one image.

    Args:
        image: (H, W, 3) uint8 RGB guide.
        target: (H, W) or (B, H, W) float values to smooth, on the image's device.
        confidence: the target's shape, float >= 0: how much each target value is trusted.
        params: grid sigmas (pixels / intensity levels), smoothness ``lam``, CG tolerance and iteration cap.
    Returns:
        float64 solution of the target's shape.
    Raises:
        ValueError: shapes or devices do not match.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 RGB, got shape {tuple(image.shape)}")
    if target.shape[-2:] != image.shape[:2] or target.ndim not in (2, 3) or confidence.shape != target.shape:
        raise ValueError(
            f"target {tuple(target.shape)} and confidence {tuple(confidence.shape)} must both be (H, W) or "
            f"(B, H, W) with the image size {tuple(image.shape[:2])}"
        )
    if target.device != image.device or confidence.device != image.device:
        raise ValueError(
            f"image, target and confidence must share a device, got {image.device}, "
            f"{target.device}, {confidence.device}"
        )
    grid = BilateralGrid(image, params)
    m, n = _bistochastize(grid)
    t = target.reshape(-1, grid.pixel_to_vertex.shape[0]).double()
    c = confidence.reshape(t.shape).double()
    c_splat = grid.splat(c)

    def apply_a(x: torch.Tensor) -> torch.Tensor:  # (lam (diag(m) - diag(n) B diag(n)) + diag(c_splat)) x
        return params.lam * (m * x - n * grid.blur(n * x)) + c_splat * x

    b = grid.splat(c * t)
    diagonal = params.lam * (m - n * n * (2 * grid.dims)) + c_splat
    inv_diagonal = 1.0 / diagonal.clamp(min=_MIN_DIAGONAL)
    # Start from the confidence-weighted mean target of each vertex: already close for most vertices.
    x0 = b / c_splat.clamp(min=_MIN_DIAGONAL)
    y = _preconditioned_cg(apply_a, b, x0, inv_diagonal, params.cg_tol, params.cg_maxiter)
    return grid.slice(y).reshape(target.shape)


def bilateral_refine(image: torch.Tensor, masks: torch.Tensor, params: SolverParameters) -> torch.Tensor:
    """Bilateral-solver refinement of several binary masks of one image, as
    ``stages.refinement.refine.bilateral_refine`` does for one: solve with the uniform confidence
    ``params.confidence``, keep > 0.5, fill holes, keep the largest 4-connected component.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (B, H, W) bool coarse masks, on the image's device.
        params: solver parameters (SPEC "Refinement").
    Returns:
        (B, H, W) bool refined masks on the image's device.
    """
    if masks.ndim != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be (B, H, W) bool, got shape {tuple(masks.shape)} dtype {masks.dtype}")
    if masks.shape[0] == 0:
        return masks.clone()
    confidence = torch.full(masks.shape, params.confidence, dtype=torch.float64, device=masks.device)
    solved = bilateral_solve(image, masks.double(), confidence, params)
    return largest_component(fill_holes(solved > 0.5))
