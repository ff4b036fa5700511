"""The k-eigenvector solver agrees with a dense eigendecomposition; key treatments and the key bias."""

import numpy as np
import pytest
import scipy.linalg
import torch

from stages.discovery.ncut import (
    KEY_TREATMENTS,
    binary_affinity,
    fiedler_vector,
    isolate_nodes,
    smallest_eigenvectors,
    treat_keys,
    unit_keys,
)
from stages.features.backbone import Backbone
from tests.test_ncut import object_keys

EPS = 1e-5


def dense_reference(affinity: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The full generalized eigendecomposition (no subset), eigenpairs 2 .. k+1."""
    a = affinity.double().numpy()
    d = np.diag(a.sum(axis=1))
    values, vectors = scipy.linalg.eigh(d - a, d)
    return values[1 : k + 1], vectors[:, 1 : k + 1].T


def assert_spectrum_matches(affinity: torch.Tensor, k: int) -> None:
    fast = smallest_eigenvectors(affinity, k, "fast")
    values, vectors = dense_reference(affinity, k)
    assert fast.converged
    np.testing.assert_allclose(fast.values, values, atol=1e-6)
    d = affinity.double().sum(dim=1).numpy()
    for got, want in zip(fast.vectors.numpy(), vectors, strict=True):
        cosine = abs(got @ (d * want)) / np.sqrt((got @ (d * got)) * (want @ (d * want)))
        assert cosine > 1 - 1e-6  # the same vector (up to sign) in the D inner product
        np.testing.assert_allclose(got @ (d * got), 1.0, rtol=1e-6)  # v^T D v = 1 (D summed in float32)
        assert got[np.argmax(np.abs(got))] > 0  # the canonical sign, as the Fiedler vector has


@pytest.mark.parametrize(
    "grid, boxes, noise, tau, k",
    [
        ((20, 24), [(2, 2, 8, 9), (12, 14, 18, 22), (2, 15, 7, 22)], 0.9, 0.15, 4),  # three objects
        ((24, 20), [(5, 5, 15, 15), (16, 2, 22, 8)], 1.3, 0.2, 5),  # noisy: many edges cross tau
        ((17, 41), [(2, 3, 9, 14), (8, 25, 15, 38)], 0.7, 0.15, 3),  # non-square
    ],
)
def test_k_eigenvectors_match_the_dense_decomposition(grid, boxes, noise, tau, k):
    keys = object_keys(grid, boxes, noise, seed=len(boxes) + k)
    assert_spectrum_matches(binary_affinity(unit_keys(keys, False), tau, EPS), k)


def test_k_eigenvectors_on_centred_keys_and_isolated_nodes():
    """The DINOv2 setting (centred keys, tau 0) and MaskCut's later graphs (taken patches isolated)."""
    keys = object_keys((18, 26), [(2, 3, 12, 11), (6, 15, 16, 24)], noise=1.0, seed=5)
    affinity = binary_affinity(unit_keys(keys, True), 0.0, EPS)
    assert_spectrum_matches(affinity, 4)
    taken = torch.zeros(18 * 26, dtype=torch.bool)
    taken[: 26 * 5] = True
    assert_spectrum_matches(isolate_nodes(affinity.clone(), taken, 0.0, EPS), 3)


def test_a_repeated_eigenvalue_gives_independent_vectors():
    """Three identical disconnected cliques: lambda = 0 twice (beside the trivial one). A single Krylov
    space would hold one vector of that eigenspace; one run per vector must return two, spanning it."""
    blocks = [torch.ones(20, 20)] * 3
    affinity = torch.block_diag(*blocks).clamp(min=EPS)
    fast = smallest_eigenvectors(affinity, 3, "fast")
    values, vectors = dense_reference(affinity, 3)
    np.testing.assert_allclose(fast.values, values, atol=1e-6)
    d = affinity.double().sum(dim=1)
    # Each fast vector is an eigenvector: (D - A) v = lambda D v ...
    for value, vector in zip(fast.values, fast.vectors, strict=True):
        residual = (torch.diag(d) - affinity.double()) @ vector - value * d * vector
        assert float(residual.norm()) < 1e-6
    # ... and the two of eigenvalue ~0 span the dense pair's eigenspace (D-orthonormal bases).
    basis = torch.from_numpy(vectors[:2]) * d.sqrt()
    got = fast.vectors[:2] * d.sqrt()
    assert torch.linalg.matrix_rank(got, atol=1e-6) == 2
    np.testing.assert_allclose(torch.linalg.svdvals(got @ basis.T).numpy(), [1.0, 1.0], atol=1e-6)


def test_the_first_vector_is_the_fiedler_vector_bit_for_bit():
    keys = object_keys((20, 24), [(3, 4, 10, 12)], noise=0.5, seed=1)
    affinity = binary_affinity(unit_keys(keys, False), 0.2, EPS)
    assert torch.equal(
        smallest_eigenvectors(affinity, 3, "fast").vectors[0], fiedler_vector(affinity, "fast")
    )
    # LAPACK computes a 2-vector subset differently from a 1-vector one: equal to rounding, not in bits
    dense = smallest_eigenvectors(affinity, 2, "dense")
    assert torch.allclose(dense.vectors[0], fiedler_vector(affinity, "dense"), rtol=0, atol=1e-9)


def test_spectrum_errors():
    affinity = torch.ones(5, 5)
    for k in (0, 5):
        with pytest.raises(ValueError, match="eigenvectors asked"):
            smallest_eigenvectors(affinity, k, "fast")
    with pytest.raises(ValueError, match="unknown eigensolver"):
        smallest_eigenvectors(affinity, 1, "arpack")


def test_key_treatments():
    keys = torch.randn(12, 8) + 3.0
    bias = torch.randn(8)
    assert torch.equal(treat_keys(keys, "raw"), keys)
    assert torch.allclose(treat_keys(keys, "centered").mean(dim=0), torch.zeros(8), atol=1e-6)
    assert torch.equal(treat_keys(keys, "no_bias", bias), keys - bias)
    batch = torch.stack([keys, 2 * keys])  # (images, n, d), as unit_keys takes them too
    assert torch.allclose(treat_keys(batch, "centered")[1], treat_keys(2 * keys, "centered"))
    assert torch.equal(treat_keys(batch, "no_bias", bias)[1], 2 * keys - bias)
    assert KEY_TREATMENTS == ("raw", "centered", "no_bias")
    with pytest.raises(ValueError, match="needs the"):
        treat_keys(keys, "no_bias")
    with pytest.raises(ValueError, match="needs the"):
        treat_keys(keys, "no_bias", torch.zeros(7))
    with pytest.raises(ValueError, match="unknown key treatment"):
        treat_keys(keys, "whitened", bias)


def test_key_bias_is_what_the_keys_carry_from_the_projection():
    """Keys minus ``Backbone.key_bias`` are the keys of the same model with its key bias set to zero."""
    backbone = Backbone("test_vit_tiny", None, "cpu", random_init=True)
    qkv = backbone.model.blocks[-1].attn.qkv
    dim = qkv.weight.shape[1]
    with torch.no_grad():
        qkv.bias[dim : 2 * dim] = torch.linspace(-3, 3, dim)  # make it large and not constant
    images = torch.randn(2, 3, 32, 40)
    keys = backbone(images).keys
    bias = backbone.key_bias
    assert bias.shape == (dim,)
    with torch.no_grad():
        qkv.bias[dim : 2 * dim] = 0
    unbiased = backbone(images).keys
    for b in range(2):
        assert torch.allclose(treat_keys(keys[b], "no_bias", bias), unbiased[b], atol=1e-5)
