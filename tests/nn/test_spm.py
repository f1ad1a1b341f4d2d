import numpy as np
import pytest
import torch

from structfx import StructfxError
from structfx.nn import SPMLinear
from structfx.nn.spm_pairing import default_stages, spm_width, stage_permutations, stages_to_connect


def test_width_is_next_power_of_two():
    assert [spm_width(a, b) for a, b in [(1, 1), (37, 23), (64, 64), (65, 3)]] == [2, 64, 64, 128]


def test_butterfly_pairs_i_with_i_xor_stride():
    perms = stage_permutations(8, 4, "butterfly", 0)
    for stage, perm in enumerate(perms):
        stride = 1 << (stage % 3)
        assert all(q == p ^ stride and p < q for p, q in zip(perm[0::2], perm[1::2]))
        assert sorted(perm) == list(range(8))


@pytest.mark.parametrize("width", [2, 16, 256])
def test_orthogonal_is_orthogonal_at_unit_diagonals(width):
    layer = SPMLinear(width, width).double()
    dense = layer.to_dense()
    torch.testing.assert_close(dense @ dense.T, torch.eye(width, dtype=torch.float64))


@pytest.mark.parametrize("width", [8, 64, 512])
def test_random_pairing_picks_the_fewest_connecting_stages(width):
    stages = default_stages(width, "random", seed=3)
    perms = stage_permutations(width, stages, "random", 3)
    assert stages_to_connect(perms) == stages
    assert stages >= np.log2(width)
    layer = SPMLinear(width, width, pairing="random", seed=3).double()
    assert layer.stages == stages and (layer.to_dense() != 0).all()


def test_butterfly_log2n_stages_connect_but_fewer_do_not():
    perms = stage_permutations(64, 6, "butterfly", 0)
    assert stages_to_connect(perms) == 6
    assert stages_to_connect(perms[:5]) is None


def test_fit_recovers_an_spm_weight_and_reports_error():
    torch.manual_seed(0)
    teacher = SPMLinear(32, 32)
    with torch.no_grad():
        teacher.d_out.uniform_(0.5, 2.0)
    weight = teacher.to_dense().detach()
    layer, error = SPMLinear.from_dense(weight, steps=400, lr=0.05, seed=1)
    assert error < 0.05
    x = torch.randn(100, 32)
    measured = (layer(x) - x @ weight.T).norm() / (x @ weight.T).norm()
    assert measured < 0.1


def test_fit_to_generic_dense_is_honest_about_error():
    torch.manual_seed(0)
    weight = torch.randn(64, 64)
    layer, error = SPMLinear.from_dense(weight, steps=50)
    x = torch.randn(512, 64)
    with torch.no_grad():
        measured = float((layer(x) - x @ weight.T).norm() / (x @ weight.T).norm())
    assert 0.5 < error < 1.01 and abs(measured - error) < 0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="lower"), "variant='lower' is unknown"),
        (dict(pairing="shuffle"), "pairing='shuffle' is unknown"),
        (dict(stages=0), "stages=0 must be at least 1"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(StructfxError, match=message):
        SPMLinear(16, 16, **kwargs)


def test_fit_inputs_of_wrong_width_are_refused():
    with pytest.raises(StructfxError, match=r"sample inputs have 5 features but the layer takes 16"):
        SPMLinear.from_dense(torch.randn(16, 16), inputs=torch.randn(10, 5))
