"""Kind 11: the SPM fit is scale-free, works on few rows whatever was recorded, stops when the error stops
falling, fits a model's layers together (the same fit as each alone), and shows its progress only when
asked."""

import pytest
import torch

import structfx as sfx
from structfx.nn import SPMLinear, fitting
from structfx.nn.fitting import PLATEAU_WINDOW, compressed_rows, fit_to_dense
from tests.passes.field.field_b import MLP, transformed


def _fit(weight, steps, inputs=None):
    layer = SPMLinear(weight.shape[1], weight.shape[0], bias=False, generator=torch.Generator().manual_seed(0))
    error = fit_to_dense(layer, weight, None, inputs, steps, 0.05, torch.Generator().manual_seed(1), False)
    return layer, error


def test_the_fit_stops_on_a_plateau(monkeypatch):
    taken = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: taken.append(1) or step(self, *a, **k))
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) / 8
    _, error = _fit(weight, 2000)
    assert PLATEAU_WINDOW < len(taken) < 1000, len(taken)
    _, initial = _fit(weight, 0)
    assert error < 0.8 * initial  # an SPM cannot match a random dense matrix, but it gets closer than at random


def test_the_fit_does_not_depend_on_the_weight_scale():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    (small, small_error), (large, large_error) = _fit(weight * 1e-3, 60), _fit(weight * 1e3, 60)
    assert abs(small_error - large_error) < 1e-3 * small_error
    assert torch.allclose(small.to_dense() * 1e6, large.to_dense(), rtol=1e-3, atol=1e-3)


def test_recorded_rows_become_in_features_rows():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = torch.randn(8, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = compressed_rows(x)
    assert rows.shape == (16, 16)
    assert torch.allclose((a @ rows.T).norm(), (a @ x.T).norm(), rtol=1e-12)
    few = compressed_rows(x[:10])  # fewer rows than features: padded with zero rows, to stack with others
    assert few.shape == (16, 16) and torch.allclose((a @ few.T).norm(), (a @ x[:10].T).norm(), rtol=1e-12)


def test_fitting_improves_on_the_random_init():
    model, x = MLP(), torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    fitted = sfx.report(transformed(model, sfx.SPM(progress=False), (x,)))
    unfitted = sfx.report(transformed(model, sfx.SPM(fit_steps=0, progress=False), (x,)))
    for a, b in zip(fitted.replaced, unfitted.replaced):
        assert a.error < 0.9 * b.error


def test_progress_false_prints_nothing(capfd):
    transformed(MLP(), sfx.SPM(fit_steps=10, progress=False), (torch.randn(4, 64),))
    out, err = capfd.readouterr()
    assert out == "" and "fitting SPM" not in err


def test_a_tiny_t5_converts_every_wide_dense_layer():
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    config = T5Config(d_model=64, d_ff=128, num_layers=1, num_heads=2, d_kv=32, vocab_size=100,
                      decoder_start_token_id=0)
    model = T5Model(config).eval()
    g = torch.Generator().manual_seed(0)
    ids, decoder_ids = torch.randint(0, 100, (2, 8), generator=g), torch.randint(0, 100, (2, 4), generator=g)
    result = transformed(model, sfx.SPM(fit_steps=20, progress=False), (ids, None, decoder_ids))
    report = sfx.report(result)
    wide = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and min(m.weight.shape) >= 64]
    assert {row.name for row in report.replaced} == set(wide)
    assert all(0 < row.error < 1.5 for row in report.replaced)


@pytest.mark.parametrize("variant, pairing", [("orthogonal", "butterfly"), ("general", "random")])
def test_fitting_layers_together_is_fitting_each_alone(variant, pairing):
    weights = [torch.randn(12, 20, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    rows = [torch.randn(30, 20, generator=torch.Generator().manual_seed(10 + i)) * (i + 1) for i in range(3)]

    def layer(i):
        return SPMLinear(20, 12, variant, pairing=pairing, generator=torch.Generator().manual_seed(i))

    alone = [layer(i) for i in range(3)]
    errors = [fit_to_dense(alone[i], weights[i], None, rows[i], 20, 0.1, torch.Generator(), False) for i in range(3)]
    together = [layer(i) for i in range(3)]
    jobs = [fitting.FitJob(together[i], weights[i], None, rows[i], torch.Generator()) for i in range(3)]
    assert fitting.fit_many(jobs, 20, 0.1, False) == pytest.approx(errors, rel=1e-5)
    for a, b in zip(alone, together):
        assert torch.allclose(a.to_dense(), b.to_dense(), atol=1e-5)


def test_transform_fits_the_module_layers_together(monkeypatch):
    groups = []
    fit_many = fitting.fit_many
    monkeypatch.setattr("structfx.passes.rules.spm.fit_many", lambda jobs, *a, **k: groups.append(len(jobs))
                        or fit_many(jobs, *a, **k))
    model = torch.nn.Sequential(MLP(), MLP())
    threads = torch.get_num_threads()
    result = transformed(model, sfx.SPM(fit_steps=20, progress=False), (torch.randn(8, 64),))
    assert torch.get_num_threads() == threads  # small fits run on one thread, then the count comes back
    assert groups == [4]
    assert len(sfx.report(result).replaced) == 4
