"""Fast bilateral solver (Barron & Poole, "The Fast Bilateral Solver", ECCV 2016) on a sparse bilateral grid.

The solver finds the image x that stays close to a target t where the confidence c is high and is smooth
under a bilateral (edge-aware) affinity:

    minimise  lam/2 * sum_ij W_ij (x_i - x_j)^2  +  sum_i c_i (x_i - t_i)^2

W is approximated by splatting pixels onto the vertices of a grid in (x, y, luma, u, v) space, blurring
between neighbouring vertices and slicing back. The problem is solved on the (far fewer) grid vertices.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg

from stages.common.schema import fail, positive, section

# ITU-R BT.601 RGB -> YUV (Y in [0, 255], U and V centred on 0).
_RGB_TO_YUV = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168736, -0.331264, 0.5],
        [0.5, -0.418688, -0.081312],
    ]
)
# Sinkhorn-style normalisation converges in a handful of steps; the paper's code uses about ten.
_BISTOCHASTIC_ITERS = 10
# Floor of the Jacobi preconditioner's diagonal, so vertices without confidence cannot divide by zero.
_MIN_DIAGONAL = 1e-5


@section
class BilateralConfig:
    sigma_spatial: float  # grid cell size in pixels
    sigma_luma: float
    sigma_chroma: float
    lam: float  # smoothness weight
    confidence: float  # confidence of every mask pixel (TokenCut's uniform confidence)
    cg_tol: float
    cg_maxiter: int

    def validate(self, key: str) -> None:
        for name in (
            "sigma_spatial",
            "sigma_luma",
            "sigma_chroma",
            "lam",
            "confidence",
            "cg_tol",
            "cg_maxiter",
        ):
            positive(f"{key}.{name}", getattr(self, name))
        if self.confidence >= 1:
            fail(f"{key}.confidence", f"must be in (0, 1), got {self.confidence}")


class BilateralGrid:
    """Splat/blur/slice operators of one image's bilateral grid.

    Attributes: ``pixel_to_vertex`` (npix,) vertex index of every pixel (row-major), ``n_vertices``,
    ``splat`` (n_vertices x npix sparse, sums pixels into vertices), ``blur`` (n_vertices x n_vertices sparse,
    centre weight 2*dims plus 1 for each +-1 neighbour along each of the 5 dimensions).
    """

    def __init__(self, image: np.ndarray, cfg: BilateralConfig):
        coords = _grid_coordinates(image, cfg)
        # Give every coordinate one free slot below and above, so that the +-1 neighbour of a vertex never
        # aliases onto another vertex through the mixed-radix hash.
        coords -= coords.min(axis=0) - 1
        extent = coords.max(axis=0) + 2
        strides = np.cumprod(np.concatenate([[1], extent[:-1]]))
        keys = coords @ strides
        vertex_keys, self.pixel_to_vertex = np.unique(keys, return_inverse=True)
        self.pixel_to_vertex = self.pixel_to_vertex.ravel()
        self.n_vertices = len(vertex_keys)
        n_pixels = len(keys)
        self.splat = sp.csr_matrix(
            (np.ones(n_pixels), (self.pixel_to_vertex, np.arange(n_pixels))),
            shape=(self.n_vertices, n_pixels),
        )
        self.blur = _blur_matrix(vertex_keys, strides)

    def slice(self, values: np.ndarray) -> np.ndarray:
        """Vertex values (n_vertices,) -> pixel values (npix,): every pixel takes its vertex's value."""
        return values[self.pixel_to_vertex]


def _grid_coordinates(image: np.ndarray, cfg: BilateralConfig) -> np.ndarray:
    """HxWx3 uint8 RGB -> (H*W, 5) int64 grid coordinates (x, y, luma, u, v), each scaled by its sigma."""
    h, w, _ = image.shape
    yuv = image.reshape(-1, 3).astype(np.float64) @ _RGB_TO_YUV.T
    ys, xs = np.indices((h, w)).reshape(2, -1)
    sigmas = np.array(
        [cfg.sigma_spatial, cfg.sigma_spatial, cfg.sigma_luma, cfg.sigma_chroma, cfg.sigma_chroma],
        dtype=float,
    )
    scaled = np.column_stack([xs, ys, yuv]) / sigmas
    return np.rint(scaled).astype(np.int64)


def _blur_matrix(vertex_keys: np.ndarray, strides: np.ndarray) -> sp.csr_matrix:
    """Sparse blur over grid vertices: 2*dims on the diagonal, 1 between vertices one step apart in one dim.

    ``vertex_keys`` must be sorted (np.unique output); a neighbour exists when its key is among them.
    """
    n = len(vertex_keys)
    rows, cols = [], []
    for stride in strides:
        # Only +stride is looked up; the -stride neighbours are the transpose of the same pairs.
        wanted = vertex_keys + stride
        found = np.minimum(np.searchsorted(vertex_keys, wanted), n - 1)
        ok = vertex_keys[found] == wanted
        rows.append(np.flatnonzero(ok))
        cols.append(found[ok])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    one_side = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return one_side + one_side.T + 2 * len(strides) * sp.identity(n, format="csr")


def _bistochastize(grid: BilateralGrid) -> tuple[np.ndarray, np.ndarray]:
    """Vertex scalings (m, n) with diag(n) B diag(n) 1 = m = splatted pixel counts (approximately).

    Splat-blur-slice alone is not doubly stochastic, which would bias the smoothness term towards dense
    vertices; the paper rescales the blur so that its rows and columns sum to the vertex masses.
    """
    mass = np.asarray(grid.splat.sum(axis=1)).ravel()
    n = np.ones(grid.n_vertices)
    for _ in range(_BISTOCHASTIC_ITERS):
        n = np.sqrt(n * mass / (grid.blur @ n))
    m = n * (grid.blur @ n)
    return m, n


def bilateral_solve(
    image: np.ndarray, target: np.ndarray, confidence: np.ndarray, cfg: BilateralConfig
) -> np.ndarray:
    """Edge-aware smoothing of ``target`` guided by ``image``.

    Args:
        image: HxWx3 uint8 RGB guide.
        target: HxW float values to smooth.
        confidence: HxW float >= 0, how much each target value is trusted.
        cfg: grid sigmas (pixels / intensity levels), smoothness ``lam``, CG tolerance and iteration cap.
    Returns:
        HxW float64 solution.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
    if target.shape != image.shape[:2] or confidence.shape != image.shape[:2]:
        raise ValueError(
            f"target {target.shape} and confidence {confidence.shape} "
            f"must match the image size {image.shape[:2]}"
        )
    grid = BilateralGrid(image, cfg)
    m, n = _bistochastize(grid)
    t = target.reshape(-1).astype(np.float64)
    c = confidence.reshape(-1).astype(np.float64)

    smooth = sp.diags(m) - sp.diags(n) @ grid.blur @ sp.diags(n)
    c_splat = grid.splat @ c
    a = (cfg.lam * smooth + sp.diags(c_splat)).tocsr()
    b = grid.splat @ (c * t)
    preconditioner = sp.diags(1.0 / np.maximum(a.diagonal(), _MIN_DIAGONAL))
    # Start from the confidence-weighted mean target of each vertex: already close for most vertices.
    x0 = b / np.maximum(c_splat, _MIN_DIAGONAL)
    y, info = cg(a, b, x0=x0, M=preconditioner, rtol=cfg.cg_tol, maxiter=cfg.cg_maxiter)
    if info < 0:
        raise RuntimeError(f"conjugate gradient failed (info={info})")
    # info > 0 (iteration cap reached) is the normal case with the reference budget of 25 iterations.
    return grid.slice(y).reshape(target.shape)
