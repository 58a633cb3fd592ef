"""The symmetric contraction is equivariant, a polynomial of the right degree, and complete."""

import itertools

import numpy as np
import pytest
import torch
from e3nn import o3
from e3nn.util.test import assert_equivariant

from matsciml.models.symmetric_contraction import SymmetricContraction, coupling_basis

SPECIES = 3


def contraction(irreps_in, irreps_out, correlation):
    torch.manual_seed(0)
    return SymmetricContraction(irreps_in, irreps_out, correlation, num_species=SPECIES).double()


def inputs(module, atoms=7):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(atoms, module.irreps_in.dim, dtype=torch.float64, generator=generator)
    species = torch.randint(0, SPECIES, (atoms,), generator=generator)
    return features, species


@pytest.fixture
def float64_default():
    # e3nn builds its Wigner D matrices from generators in the default dtype: in float32 they are
    # a representation only to ~1e-7, which would hide a real equivariance error of that size
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize(
    ("irreps_in", "irreps_out", "correlation"),
    [
        ("4x0e+4x1o+4x2e+4x3o", "4x0e+4x1o", 1),
        ("4x0e+4x1o+4x2e+4x3o", "4x0e+4x1o", 2),
        ("4x0e+4x1o+4x2e+4x3o", "4x0e+4x1o", 3),
        ("4x0e+4x1o+4x2e+4x3o", "4x0e", 3),  # MACE's last layer
        ("3x0e+3x1o+3x1e+3x2o", "3x0e+3x0o+3x1o+3x1e+3x2e", 3),  # both parities of each l
    ],
)
def test_equivariant_under_rotations_and_reflections(irreps_in, irreps_out, correlation, float64_default):
    module = contraction(irreps_in, irreps_out, correlation)
    features, species = inputs(module)
    # irreps None: species are not transformed; rotations with and without the inversion
    errors = assert_equivariant(
        module,
        args_in=[features, species],
        irreps_in=[module.irreps_in, None],
        irreps_out=[module.irreps_out],
        tolerance=1e-10,
    )
    assert {parity for parity, _ in errors} == {0, 1}, "proper and improper rotations both ran"


def test_path_counts_match_e3nn_reduced_tensor_products():
    # the independent symmetric couplings of nu copies of A: as many as e3nn's decomposition of the
    # symmetric power. nu = 3 for l_max 3 takes 9 s in e3nn, so its counts are golden values from
    # o3.ReducedTensorProducts("ijk=jik=ikj", i="0e+1o+2e+3o"): 8x0e, 12x1o
    square = o3.ReducedTensorProducts("ij=ji", i="0e+1o+2e+3o").irreps_out
    basis = coupling_basis("0e+1o+2e+3o", "0e+1o+2e+3o", 2)
    for mul, ir in square:
        if str(ir) in ("0e", "1o", "2e", "3o"):
            assert len(basis[2][str(ir)]) == mul
    cube = coupling_basis("0e+1o+2e+3o", "0e+1o", 3)[3]
    assert (len(cube["0e"]), len(cube["1o"])) == (8, 12)
    small = o3.ReducedTensorProducts("ijk=jik=ikj", i="0e+1o+1e").irreps_out
    cube_small = coupling_basis("0e+1o+1e", "0e+0o+1o+1e", 3)[3]
    for mul, ir in small:
        if ir.l <= 1:
            assert len(cube_small[str(ir)]) == mul


def test_coefficients_are_symmetric_in_the_copies_and_orthonormal():
    for nu, per_irrep in coupling_basis("0e+1o+2e", "0e+1o+2e", 3).items():
        for tensor in per_irrep.values():
            for order in itertools.permutations(range(1, nu + 1)):
                assert torch.allclose(tensor.permute(0, *order, nu + 1), tensor, atol=1e-12)
            flat = tensor.reshape(len(tensor), -1)
            assert torch.allclose(flat @ flat.T, torch.eye(len(tensor), dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("correlation", [1, 2, 3])
def test_output_is_a_polynomial_of_degree_correlation_without_constant(correlation):
    module = contraction("2x0e+2x1o+2x2e", "2x0e+2x1o", correlation)
    features, species = inputs(module, atoms=4)
    scales = np.linspace(-2.0, 2.0, 13)
    with torch.no_grad():
        values = np.stack([module(scale * features, species).numpy().ravel() for scale in scales])
    fit = np.polynomial.polynomial.polyfit(scales, values, deg=correlation + 2)  # (degree + 1, outputs)
    size = np.abs(fit).max()
    assert np.abs(fit[0]).max() < 1e-10 * size, "no constant term"
    assert np.abs(fit[correlation + 1 :]).max() < 1e-10 * size, f"no term above t^{correlation}"
    assert np.abs(fit[correlation]).max() > 1e-3 * size, f"the t^{correlation} term is there"


def test_channels_do_not_mix_and_species_have_their_own_weights():
    module = contraction("3x0e+3x1o+3x2e", "3x0e+3x1o", 3)
    features, species = inputs(module, atoms=2)
    jacobian = torch.autograd.functional.jacobian(lambda x: module(x, species), features)  # (2, 12, 2, 18)

    def channel_of_each_component(dims):  # e3nn layout: per irrep, channel-major
        return torch.tensor([k for dim in dims for k in range(3) for _ in range(dim)])

    channel_out, channel_in = channel_of_each_component([1, 3]), channel_of_each_component([1, 3, 5])
    other_channel = channel_out[:, None] != channel_in[None, :]
    assert jacobian[0, :, 0][other_channel].abs().max() == 0
    assert jacobian[0, :, 0][~other_channel].abs().max() > 0
    assert jacobian[0, :, 1].abs().max() == 0, "atoms do not mix"
    with torch.no_grad():
        outputs = [module(features, torch.full((2,), z)) for z in range(SPECIES)]
    assert not torch.allclose(outputs[0], outputs[1])


def test_float64_and_float32_agree():
    module = contraction("2x0e+2x1o+2x2e+2x3o", "2x0e+2x1o", 3)
    features, species = inputs(module)
    double = module(features, species)
    single = module.float()(features.float(), species)
    assert double.dtype == torch.float64 and single.dtype == torch.float32
    assert module.coefficients_3.dtype == torch.float32
    assert torch.allclose(single.double(), double, rtol=1e-4, atol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="same multiplicity"):
        SymmetricContraction("4x0e+2x1o", "4x0e", 2, num_species=1)
    with pytest.raises(ValueError, match="no product"):
        SymmetricContraction("4x0e", "4x0e+4x1o", 3, num_species=1)
    with pytest.raises(ValueError, match="correlation must be at least 1"):
        SymmetricContraction("4x0e", "4x0e", 0, num_species=1)


def test_matches_the_dense_contraction_of_the_coupling_tensors():
    # the fast path (sorted monomials times ordering counts) against the textbook sum over all index tuples
    module = contraction("2x0e+2x1o+2x2e", "2x0e+2x1o", 3)
    features, species = inputs(module, atoms=3)
    basis = coupling_basis("0e+1o+2e", "0e+1o", 3)
    a = torch.cat([features[:, s].reshape(3, 2, -1) for s in module.irreps_in.slices()], dim=-1)  # (n, k, d)
    expected = []
    for position, (_, ir) in enumerate(module.irreps_out):
        per_nu = []
        for nu in (1, 2, 3):
            tensor = basis[nu].get(str(ir))
            if tensor is None:
                continue
            letters = "abc"[:nu]
            operands = ",".join(f"nk{x}" for x in letters)
            per_nu.append(torch.einsum(f"p{letters}m,{operands}->nkpm", tensor, *[a] * nu) * ir.dim**0.5)
        b = torch.cat(per_nu, dim=2)
        expected.append(torch.einsum("nkpm,nkp->nkm", b, module.weights[position][species]).reshape(3, -1))
    assert torch.allclose(module(features, species), torch.cat(expected, dim=-1), atol=1e-12)
