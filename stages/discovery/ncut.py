"""Normalized-cut building blocks shared by TokenCut and MaskCut: the patch graph, the generalized
eigensolve, and the step from an eigenvector to an object mask on the patch grid.

Notation: n = h*w patches, keys (n, d) with the CLS token removed, grid = (h, w) in row-major order.

The eigensolve. The cut needs the second-smallest generalized eigenvector v of (D - A) v = lambda D v.
'dense' solves that with LAPACK, as the reference code does (seconds for 3600 nodes on 2 CPU cores).
'fast' solves the equivalent symmetric problem on N = D^-1/2 A D^-1/2: with u = D^1/2 v, N u = (1 - lambda) u,
so the wanted u belongs to the second-largest eigenvalue mu2 = 1 - lambda2 of N. The largest is known in
closed form (mu1 = 1, u1 = D^1/2 1), so Lanczos runs on N restricted to the orthogonal complement of u1,
where the wanted vector is the top one. A step costs one matrix-vector product with A (in A's dtype, on
A's device: float32 on CPU or GPU); the Krylov basis, its full re-orthogonalisation and the tridiagonal
eigenproblem are float64. It stops when the Ritz residual |N u - mu u| is below 1e-6 times the gap to the
next Ritz value (or below 1e-8), which real DINO key graphs reach in 5-20 steps.
Accuracy. float32 products perturb N by about 1e-6, which turns the vector by about 1e-6 / (lambda3 -
lambda2). So when the gap comes out below 1e-2 the solve is redone with a float64 copy of A (rare on real
graphs; it costs about a dense float64 pass over A per step). Rows with a single repeated value (MaskCut's
taken patches: eps-only rows) are treated exactly: their products are computed in float64, and their
entries are set from the closed form v_i = mean(v) / (1 - lambda2) that their equation gives, because
they sit within lambda2 / (1 - lambda2) |mean(v)| of the cut threshold and their tiny degree (n eps)
magnifies rounding by 1 / sqrt(n eps).

Sign. An eigenvector's sign is arbitrary and MaskCut's flip rule is not sign-invariant, so both solvers
return the sign fixed by one rule (``canonical_sign``): the entry of largest magnitude is positive; when
entries of both signs are within a relative 1e-4 of that magnitude, the lowest-index one among them is.

Near-degenerate graphs. When lambda2 and lambda3 coincide, the second eigenvector is not unique: every
vector of the eigenspace is a valid answer, and which one a solver returns is an accident of its
arithmetic. The dense solver returns LAPACK's inverse-iteration vector; the fast one returns the top Ritz
vector of its Krylov space: the part of its fixed, seeded start vector that lies in the eigenspace. Their
bipartitions can then differ, both being correct cuts of equal value. With the float64 pass the two agree
to ~1e-3 rad down to gaps of about 1e-9; tools/bench_ncut.py counts the graphs below its
near-degeneracy gap apart and checks there that the fast vector is an eigenvector of eigenvalue lambda2
instead of comparing cuts. Exactly tied entries of v (symmetric synthetic scenes) are a separate matter:
there the seed argmax |v| of TokenCut and MaskCut is decided by rounding, whichever solver is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy import ndimage

# Numerical settings of the 'fast' solver. They decide how exactly the eigenvector is computed, not which
# one, so they are constants here rather than method parameters in configs/.
RITZ_TOL = 1e-6  # stop at residual <= RITZ_TOL * gap: the vector is then within ~1e-6 rad of the true one
RESIDUAL_FLOOR = 1e-8  # ... or at this residual (1e-12 in float64); N's norm is 1
FLOAT64_GAP = 1e-2  # below this lambda3 - lambda2, float32 rounding (~1e-6 in N x) could turn the vector
LANCZOS_MAX_STEPS = 300  # real key graphs need 5-20 steps
BREAKDOWN = 1e-12  # a Lanczos vector this small means the Krylov space is invariant: the answer is exact
SIGN_TIE = 1e-4  # entries within this relative distance of the largest magnitude tie for the sign rule


KEY_TREATMENTS = ("raw", "centered", "no_bias")


def treat_keys(keys: torch.Tensor, treatment: str, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., n, d) keys -> (..., n, d) float32 keys, before any graph is built from them.

    'raw': unchanged. 'centered': minus the image's mean key (data-driven; MaskCut's and FreeMask's
    DINOv2 default). 'no_bias': minus ``key_bias`` (d,), the last block's key-projection bias (heads
    concatenated, as ``Backbone.key_bias`` gives it): softmax attention is unchanged by a constant added to
    every key, so training never bounds that bias, and in DINOv2-S/14 it is most of every key (README, "Key
    bias"); removing it is a per-backbone fix that does not depend on the image. Raises ValueError for an
    unknown treatment or a missing / mis-shaped bias.
    """
    if treatment not in KEY_TREATMENTS:
        raise ValueError(f"unknown key treatment '{treatment}', expected one of {KEY_TREATMENTS}")
    keys = keys.float()
    if treatment == "centered":
        return keys - keys.mean(dim=-2, keepdim=True)
    if treatment == "no_bias":
        if key_bias is None or key_bias.shape != keys.shape[-1:]:
            shape = None if key_bias is None else tuple(key_bias.shape)
            raise ValueError(f"key treatment 'no_bias' needs the ({keys.shape[-1]},) key bias, got {shape}")
        return keys - key_bias.to(device=keys.device, dtype=keys.dtype)
    return keys


def unit_keys(keys: torch.Tensor, center: bool) -> torch.Tensor:
    """(..., n, d) keys -> (..., n, d) rows of unit length (all-zero rows stay zero); with ``center`` the
    per-image mean key is removed first (DINOv2's keys all point the same way, SPEC "Backbone")."""
    keys = keys.float()
    if center:
        keys = keys - keys.mean(dim=-2, keepdim=True)
    return F.normalize(keys, dim=-1)


def binary_affinity(feats: torch.Tensor, tau: float, eps: float, blocks: int = 8) -> torch.Tensor:
    """Cosine graph of (n, d) unit (or all-zero) rows: 1 where the similarity is above ``tau``, ``eps``
    elsewhere. All-zero rows (patches already taken by MaskCut) become eps-only, nearly isolated nodes.

    The graph is symmetric, so only its upper triangle is computed, in ``blocks`` row blocks (about 60% of
    the products of a full F F^T), thresholded in place and mirrored; the values equal
    torch.where(F F^T > tau, 1.0, eps) bit for bit."""
    n = feats.shape[0]
    out = torch.empty(n, n, dtype=feats.dtype, device=feats.device)
    low = _float32(eps)
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    for a, b in zip(edges, edges[1:], strict=False):
        block = (feats[a:b] @ feats[a:].T).gt_(tau).clamp_(min=low)
        out[a:b, a:] = block
        out[a:, a:b] = block.T
    return out


def weighted_affinity(similarity: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """In place: the weighted graph of a (..., n, n) similarity, the similarity where it is above ``tau`` and
    ``eps`` elsewhere (ssl-vos keeps the weights where TokenCut and MaskCut binarise them). Returns it."""
    return similarity.masked_fill_(similarity <= tau, _float32(eps))


def isolate_nodes(affinity: torch.Tensor, taken: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """In place: the ``binary_affinity`` of the same features after the rows ``taken`` ((n,) bool) are
    zeroed, without a new n x n x d product. A zero row's similarity to every row, itself included, is 0, so
    its row and column become eps (1 when tau < 0); other pairs are unchanged. Bit for bit the recomputed
    graph (MaskCut's later cuts); returns ``affinity``."""
    index = torch.nonzero(taken).flatten()
    value = 1.0 if 0.0 > tau else _float32(eps)
    return affinity.index_fill_(0, index, value).index_fill_(1, index, value)


def _float32(x: float) -> float:
    """``x`` rounded to float32, the value torch.where(..., 1.0, x) would have written."""
    return float(torch.tensor(x, dtype=torch.float32))


def fiedler_vector(affinity: torch.Tensor, solver: str) -> torch.Tensor:
    """Second-smallest generalized eigenvector v of (D - A) v = lambda D v, D = diag(row sums of A).

    affinity: (n, n) symmetric, positive row sums. solver: 'dense' (the reference: LAPACK, float64, CPU) or
    'fast' (Lanczos, see the module docstring). Returns the (n,) float64 vector on the affinity's device,
    scaled to v^T D v = 1, with the sign fixed by ``canonical_sign``. Every caller goes through here, so
    the solver is swapped in one place.
    """
    if solver == "dense":
        vec = dense_fiedler(affinity)
    elif solver == "fast":
        vec = lanczos_fiedler(affinity).vector
    else:
        raise ValueError(f"unknown eigensolver '{solver}'")
    return canonical_sign(vec)


def dense_fiedler(affinity: torch.Tensor) -> torch.Tensor:
    """The reference formulation: a dense generalized symmetric eigensolve (LAPACK via scipy) in float64.
    (n, n) affinity -> (n,) vector with v^T D v = 1 (sign as LAPACK leaves it). Raises
    np.linalg.LinAlgError on a graph LAPACK cannot solve (D not positive definite)."""
    a = affinity.detach().cpu().double().numpy()
    d = a.sum(axis=1)
    _, vecs = scipy.linalg.eigh(np.diag(d) - a, np.diag(d), subset_by_index=[1, 1])
    return torch.from_numpy(vecs[:, 0]).to(affinity.device)


@dataclass
class Fiedler:
    """What the fast solver found: the vector (v^T D v = 1), lambda2, the next Ritz value (an estimate of
    lambda3 from above; NaN after one step), the Ritz residual, the Lanczos steps, whether the residual met
    the tolerance (or the Krylov space became invariant), and the dtype of the products A x."""

    vector: torch.Tensor
    value: float
    next_value: float
    residual: float
    steps: int
    converged: bool
    dtype: torch.dtype


def lanczos_fiedler(affinity: torch.Tensor) -> Fiedler:
    """The 'fast' solver: (n, n) symmetric affinity with positive row sums -> ``Fiedler``.

    Runs on the affinity's device, with products A x in its dtype and all else in float64. When the
    eigenvalue gap lambda3 - lambda2 comes out below FLOAT64_GAP, float32 products are not exact enough to
    tell the two eigenvectors apart reliably, and the solve is redone with a float64 copy of A. Raises
    np.linalg.LinAlgError, as the dense solver does, when a row sum is not positive or the result is not
    finite.
    """
    a = affinity.detach()
    result = lanczos_solve(a)
    if a.dtype != torch.float64 and result.next_value - result.value < FLOAT64_GAP:
        result = lanczos_solve(a.double())
    return result


def lanczos_solve(a: torch.Tensor, found: torch.Tensor | None = None) -> Fiedler:
    """One Lanczos solve of (D - A) v = lambda D v through N = D^-1/2 A D^-1/2, products in A's dtype.

    ``found``: (j, n) orthonormal rows u = D^1/2 v of eigenvectors already found, deflated with N's known
    top vector, so the answer is the next one (``lanczos_eigenvectors``); None for the Fiedler vector."""
    degree, rows, weight = graph_degree(a)
    scale = degree.rsqrt()
    top = degree.sqrt() / degree.sqrt().norm()  # N's eigenvector of eigenvalue 1, deflated exactly

    def normalized(x: torch.Tensor) -> torch.Tensor:  # N x = D^-1/2 A D^-1/2 x
        z = x * scale
        y = a.mv(z.to(a.dtype)).double()
        # Rows of one repeated weight (MaskCut's taken patches) in float64: their tiny degree would blow
        # the float32 rounding of the product up by 1/sqrt(n * eps).
        y[rows] = weight * z.sum()
        return y * scale

    # A fixed pseudo-random start, drawn on the CPU so every device starts from the same vector.
    start = torch.rand(a.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5
    floor = RESIDUAL_FLOOR if a.dtype != torch.float64 else 1e-4 * RESIDUAL_FLOOR
    deflate = top[None] if found is None else torch.cat([top[None], found.to(top)])
    values, u, residual, steps, converged = lanczos_top(normalized, start.to(a.device), deflate, floor)
    value = 1.0 - values[-1]
    next_value = 1.0 - values[-2] if len(values) > 1 else float("nan")
    vec = settle_constant_rows(u * scale, value, rows)
    vec = vec / (vec * degree * vec).sum().sqrt()
    if not bool(torch.isfinite(vec).all()):
        raise np.linalg.LinAlgError("Lanczos produced a non-finite vector")
    return Fiedler(vec, value, next_value, residual, steps, converged, a.dtype)


def graph_degree(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 degrees of the (n, n) affinity, with rows of one repeated weight (``constant_rows``) given
    their exact degree n * weight. Returns (degree, those rows, their weight); raises LinAlgError when a
    degree is not positive."""
    # float32 sums are cascaded, so accurate to ~1e-7 relative; a float64 sum would first copy A to float64.
    degree = a.sum(dim=1).double()
    rows, weight = constant_rows(a, degree)
    degree[rows] = a.shape[1] * weight
    if not bool((degree > 0).all()):
        raise np.linalg.LinAlgError("a node has no positive degree: D is not positive definite")
    return degree, rows, weight


@dataclass
class Spectrum:
    """The k smallest non-trivial generalized eigenpairs of (D - A) v = lambda D v: ``values`` lambda_2 ..
    lambda_{k+1} ascending, ``vectors`` (k, n) float64 with v^T D v = 1 and ``canonical_sign``, the next
    eigenvalue's estimate (fast solver: from above, NaN when unknown), Lanczos steps in all (0 for dense),
    and whether every vector converged."""

    values: list[float]
    vectors: torch.Tensor
    next_value: float
    steps: int
    converged: bool


def smallest_eigenvectors(affinity: torch.Tensor, k: int, solver: str) -> Spectrum:
    """The k smallest non-trivial generalized eigenvectors of the (n, n) affinity (Deep Spectral Methods
    and VoteCut need more than the Fiedler vector). solver 'dense' (LAPACK, float64) or 'fast' (Lanczos,
    ``lanczos_eigenvectors``); with 'fast' the first vector is ``fiedler_vector``'s, bit for bit. Raises
    ValueError for k outside [1, n - 1] or an unknown solver, LinAlgError as ``fiedler_vector`` does."""
    n = affinity.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k = {k} eigenvectors asked of a graph of {n} nodes (need 1 <= k < n)")
    if solver == "dense":
        return dense_eigenvectors(affinity, k)
    if solver == "fast":
        return lanczos_eigenvectors(affinity, k)
    raise ValueError(f"unknown eigensolver '{solver}'")


def dense_eigenvectors(affinity: torch.Tensor, k: int) -> Spectrum:
    """The reference: LAPACK's generalized eigensolve (scipy) of eigenpairs 2 .. k+1, float64, CPU."""
    a = affinity.detach().cpu().double().numpy()
    d = np.diag(a.sum(axis=1))
    values, vecs = scipy.linalg.eigh(d - a, d, subset_by_index=[1, min(k + 1, a.shape[0] - 1)])
    vectors = torch.stack([canonical_sign(torch.from_numpy(v)) for v in vecs.T[:k]]).to(affinity.device)
    next_value = float(values[k]) if len(values) > k else float("nan")
    return Spectrum(values[:k].tolist(), vectors, next_value, 0, True)


def lanczos_eigenvectors(affinity: torch.Tensor, k: int) -> Spectrum:
    """The 'fast' solver for k vectors: the Fiedler vector from ``lanczos_fiedler`` (the same computation,
    so the same bits), then each next vector by the same Lanczos run with the vectors found so far deflated
    beside N's known top one. One vector per run, so an eigenvalue of multiplicity m yields m independent
    vectors (a single Krylov space holds only one vector of each eigenspace). Each vector whose eigenvalue
    lies within FLOAT64_GAP of its neighbours is recomputed with float64 products, as the Fiedler vector is.
    """
    a = affinity.detach()
    degree = graph_degree(a)[0]
    results = [lanczos_fiedler(a)]
    a64 = a if a.dtype == torch.float64 else None
    found = torch.empty(0, a.shape[0], dtype=torch.float64, device=a.device)
    for _ in range(1, k):
        # Deflate u = D^1/2 v, made exactly orthonormal to those before (the solves leave ~1e-6 overlaps).
        u = _orthogonal_to(results[-1].vector * degree.sqrt(), found)
        found = torch.cat([found, (u / u.norm())[None]])
        result = lanczos_solve(a, found)
        gaps = (result.next_value - result.value, result.value - results[-1].value)
        if a.dtype != torch.float64 and any(gap < FLOAT64_GAP for gap in gaps):  # (NaN: never below)
            a64 = a.double() if a64 is None else a64
            result = lanczos_solve(a64, found)
        results.append(result)
    vectors = torch.stack([canonical_sign(r.vector) for r in results])
    steps = sum(r.steps for r in results)
    converged = all(r.converged for r in results)
    return Spectrum([r.value for r in results], vectors, results[-1].next_value, steps, converged)


def settle_constant_rows(vec: torch.Tensor, value: float, rows: torch.Tensor) -> torch.Tensor:
    """``vec`` with its entries on constant ``rows`` replaced by their exact value given the others.

    A row with all entries c has degree n c, and its line of (D - A) v = lambda D v reads
    v_i (1 - lambda) = mean(v), the same for every such row. Computed from the Lanczos vector, v_i carries
    its error times 1/sqrt(n eps), while the cut needs v_i - mean(v) = lambda / (1 - lambda) mean(v), a
    tiny margin when lambda is small. So the k rows get their common value from the other entries,
    c = (sum of the others) / (n (1 - lambda) - k): their side of the cut is then the sign of a sum over the
    whole graph, as in the float64 reference, not rounding noise.
    """
    n, k = vec.shape[0], rows.numel()
    denominator = n * (1.0 - value) - k
    # With lambda = 1 (say, a complete graph: every row constant) the rows' equations only ask mean(v) = 0,
    # and where the denominator vanishes v_i is not fixed by the other entries: keep the computed values.
    if k == 0 or k == n or 1.0 - value < 1e-6 or abs(denominator) < 1e-6 * n:
        return vec
    rest = torch.ones(n, dtype=torch.bool, device=vec.device)
    rest[rows] = False
    vec = vec.clone()
    vec[rows] = vec[rest].sum() / denominator
    return vec


def constant_rows(affinity: torch.Tensor, degree: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the (n, n) ``affinity`` whose entries are all equal (MaskCut's eps-only rows), found among
    the rows whose ``degree`` is n times their diagonal entry. Returns (row indices, their float64 weight)."""
    n = affinity.shape[1]
    diagonal = affinity.diagonal().double()
    candidates = torch.nonzero(torch.isclose(degree, n * diagonal, rtol=1e-4, atol=0.0)).flatten()
    low, high = torch.aminmax(affinity[candidates], dim=1)
    rows = candidates[low == high]
    return rows, diagonal[rows]


def lanczos_top(
    operator, start: torch.Tensor, deflate: torch.Tensor, floor: float
) -> tuple[list[float], torch.Tensor, float, int, bool]:
    """Largest eigenpair of a symmetric linear ``operator`` (float64 (n,) -> (n,)) on the orthogonal
    complement of the orthonormal rows of ``deflate`` (k, n), by Lanczos with full re-orthogonalisation.

    Stops when the Ritz residual is below max(RITZ_TOL * gap to the next Ritz value, ``floor``), when the
    Krylov space is invariant or exhausts the space, or after LANCZOS_MAX_STEPS steps. Returns (Ritz values
    ascending, unit Ritz vector of the largest, its residual estimate, steps taken, whether it converged).
    """
    n = start.shape[0]
    size = min(LANCZOS_MAX_STEPS, n - deflate.shape[0])
    basis = start.new_empty(size, n)  # Lanczos vectors as rows; only rows already written are read
    q = _orthogonal_to(start, deflate, basis[:0])
    q = q / q.norm()
    alpha: list[float] = []
    beta: list[float] = []
    for k in range(size):
        basis[k] = q
        w = operator(q)
        alpha.append(float(q @ w))
        # Against everything found so far, twice ("twice is enough"), so no ghost copies of converged
        # eigenvalues appear; this also replaces the three-term recurrence.
        w = _orthogonal_to(w, deflate, basis[: k + 1])
        beta.append(float(w.norm()))
        # LAPACK's tridiagonal solver: O(k^2), where a dense eigh of T can take 0.1 s on a busy CPU.
        values, vectors = scipy.linalg.eigh_tridiagonal(np.array(alpha), np.array(beta[:-1]))
        residual = beta[-1] * abs(float(vectors[-1, -1]))
        gap = float(values[-1] - values[-2]) if k else 0.0
        converged = residual <= max(RITZ_TOL * gap, floor) or beta[-1] <= BREAKDOWN
        if converged:
            break
        q = w / beta[-1]
    ritz = torch.from_numpy(vectors[:, -1]).to(basis.device) @ basis[: k + 1]
    exhausted = k + 1 == n - deflate.shape[0]  # the Krylov space is the whole space: the answer is exact
    return values.tolist(), ritz / ritz.norm(), residual, k + 1, converged or exhausted


def _orthogonal_to(x: torch.Tensor, *blocks: torch.Tensor) -> torch.Tensor:
    """x minus its projection on the rows of the orthonormal (k, n) ``blocks``, done twice for accuracy."""
    for _ in range(2):
        for block in blocks:
            x = x - (block @ x) @ block
    return x


def canonical_sign(vec: torch.Tensor) -> torch.Tensor:
    """``vec`` or ``-vec``: the one whose largest-magnitude entry is positive. Entries within a relative
    SIGN_TIE of the largest magnitude tie; among tied entries of both signs the lowest index decides, so a
    symmetric cut (two equal objects, +c and -c) gets the same sign from every solver."""
    magnitude = vec.abs()
    tied = torch.nonzero(magnitude >= (1.0 - SIGN_TIE) * magnitude.max())
    return -vec if float(vec[int(tied[0, 0])]) < 0 else vec


def bipartition(vec: torch.Tensor) -> np.ndarray:
    """Foreground side of the cut: entries above the mean of the eigenvector, as a bool array."""
    v = vec.detach().cpu().numpy()
    return v > v.mean()


def seed_component(foreground: np.ndarray, seed: int) -> np.ndarray:
    """The 4-connected component of the (h, w) bool ``foreground`` that contains flat index ``seed``
    (empty when the seed is background)."""
    labels, _ = ndimage.label(foreground)  # the default structure is 4-connectivity
    label = labels.flat[seed]
    return labels == label if label else np.zeros_like(foreground)


def corner_count(foreground: np.ndarray) -> int:
    """How many of the four corner patches of an (h, w) bool grid are foreground."""
    return int(foreground[0, 0]) + int(foreground[0, -1]) + int(foreground[-1, 0]) + int(foreground[-1, -1])


def patch_box(mask: np.ndarray, patch: int) -> tuple[int, int, int, int]:
    """Pixel box [x0, y0, x1, y1) covering the patches of an (h, w) bool mask (SPEC: (xmax+1)*p)."""
    ys, xs = np.nonzero(mask)
    return (
        int(xs.min()) * patch,
        int(ys.min()) * patch,
        (int(xs.max()) + 1) * patch,
        (int(ys.max()) + 1) * patch,
    )
