"""compile() on what a first user tried: negative indices, slice assignment, scans of bools, dtypes,
models with buffers, broadcast inputs and bad calls. Each matches eager PyTorch or raises StructfxError."""

import warnings

import pytest
import torch
from torch import nn

import structfx as sfx
from structfx.errors import StructfxError


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).double().norm() / want.double().norm().clamp_min(1e-12))


class Lambda(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


class Lambda2(Lambda):
    def forward(self, x, y):
        return self.function(x, y)


def _slice_assign(x):
    h = x * 2
    h[:, :4] = 0
    h[:, -3:] = 1
    h[:, 6] = 5
    h[:, -2] = 4
    return h


def _index_put_negative(x):
    h = x * 2
    h[:, [-1, 3]] = 0
    return h


def _assign_last_row(x):
    h = x * 2
    h[-1] = 3
    return h


def _assign_rows(rows: slice):
    def assign(x):
        h = x * 2
        h[rows] = 3
        return h

    return assign


#: (name, function of x (batch, 16), smallest batch it is defined at)
NEGATIVE_INDICES = [
    ("last_column", lambda x: x[:, -1], 1),
    ("second_last_column", lambda x: x[:, -2], 1),
    ("last_row", lambda x: x[-1], 1),
    ("second_last_row", lambda x: x[-2], 2),
    ("select_batch", lambda x: x.select(0, -1), 1),
    ("select_column", lambda x: x.select(1, -3), 1),
    ("slice_columns", lambda x: x[:, -5:-2], 1),
    ("slice_rows_from_end", lambda x: x[-1:], 1),
    ("slice_rows_to_end", lambda x: x[:-1], 1),
    ("narrow_columns", lambda x: x.narrow(1, -3, 2), 1),
    ("narrow_rows", lambda x: x.narrow(0, -1, 1), 1),
    ("last_of_3d", lambda x: x.reshape(x.shape[0], 4, 4)[:, -1, -1], 1),
    ("index_negative_list", lambda x: x[:, [-2, 0, -16]], 1),
    ("index_3d_negative_list", lambda x: x.reshape(x.shape[0], 4, 4)[:, :, [-2]], 1),
    ("index_put_negative", _index_put_negative, 1),
    ("slice_assignment", _slice_assign, 1),
    ("assign_last_row", _assign_last_row, 1),
    ("assign_first_rows", _assign_rows(slice(None, 2)), 2),
    ("assign_rows_after_first", _assign_rows(slice(1, None)), 1),
]


@pytest.mark.parametrize("function, smallest", [c[1:] for c in NEGATIVE_INDICES], ids=[c[0] for c in NEGATIVE_INDICES])
def test_negative_indices_match_eager_at_any_batch(function, smallest):
    model = Lambda(function)
    compiled = sfx.compile(model, torch.randn(4, 16))
    for batch in (1, 4, 7):
        if batch < smallest:
            continue
        x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(batch))
        want = model(x)
        got = compiled(x)
        assert got.shape == want.shape
        assert _relative(got, want) < 1e-5, f"batch {batch}"


def test_cumsum_of_a_bool_mask():
    model = Lambda2(lambda q, ids: q * (ids > 3).cumsum(-1).float()[..., None])
    q, ids = torch.randn(2, 8, 16), torch.randint(0, 8, (2, 8), generator=torch.Generator().manual_seed(0))
    compiled = sfx.compile(model, (q, ids))
    for batch in (1, 3):
        q, ids = torch.randn(batch, 8, 16), torch.randint(0, 8, (batch, 8))
        assert _relative(compiled(q, ids), model(q, ids)) < 1e-5


def test_float64_model_computes_in_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).double().eval()
    compiled = sfx.compile(model, torch.randn(4, 16, dtype=torch.float64))
    for batch in (1, 4, 7):
        x = torch.randn(batch, 16, dtype=torch.float64)
        got = compiled(x)
        assert got.dtype == torch.float64
        assert _relative(got, model(x)) < 1e-12


def test_float64_batched_matmul():
    model = Lambda2(lambda a, b: torch.bmm(a, b) + torch.matmul(a, b))
    a, b = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    assert _relative(sfx.compile(model, (a, b))(a, b), model(a, b)) < 1e-12


class HalfProducts(nn.Module):
    """Every matrix product converter: linear (nn.Linear), addmm with alpha and beta, mm, bmm and matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(512, 256)

    def forward(self, x, y):
        h = self.linear(x)
        return (h, torch.addmm(h, x, y, beta=0.5, alpha=2.0), torch.mm(x, y), torch.bmm(x[None], y[None])[0],
                torch.matmul(x[:, None, :], y)[:, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matrix_products_accumulate_in_float32_like_eager(dtype):
    """Eager's 16-bit matrix products sum in float32 and round once: compiled fp16 nn.Linear was 8x less accurate
    (1.8e-3 against a float64 reference, eager 2.1e-4) when its sums were float16."""
    torch.manual_seed(0)
    model = HalfProducts().to(dtype).eval()
    x, y = torch.randn(64, 512, dtype=dtype), torch.randn(512, 256, dtype=dtype)
    compiled = sfx.compile(model, (x, y))
    exact = HalfProducts().double().eval()
    exact.load_state_dict(model.state_dict())
    for got, eager, want in zip(compiled(x, y), model(x, y), exact(x.double(), y.double()), strict=True):
        assert got.dtype == dtype
        assert _relative(got.double(), want) <= 1.01 * _relative(eager.double(), want)


def test_float64_convolution_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).double()
    with pytest.raises(StructfxError, match=r"aten.convolution.default computes in float32 only .* float64"):
        sfx.compile(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))


class Counting(nn.Module):
    """A forward that updates buffers: a call counter and a running mean."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.register_buffer("n", torch.zeros(()))
        self.register_buffer("running", torch.ones(16))

    def forward(self, x):
        self.n += 1
        self.running.mul_(0.5).add_(x.mean(0))
        return self.fc(x) + self.running + self.n


def test_compile_leaves_the_model_unchanged_and_carries_the_updated_buffers():
    torch.manual_seed(0)
    model = Counting()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*updates")
        compiled = sfx.compile(model, x)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    for _ in range(3):  # eager calls from the same state, each updating it
        assert _relative(compiled(x), model(x)) < 1e-5


class AddBroadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, y):
        return self.fc(x) + y


def test_an_input_that_broadcasts_over_the_batch_stays_static():
    torch.manual_seed(0)
    model = AddBroadcast().eval()
    compiled = sfx.compile(model, (torch.randn(4, 16), torch.randn(1, 16)))
    assert compiled.inputs[1].shape == (1, 16)
    for batch in (1, 4, 7):
        x, y = torch.randn(batch, 16), torch.randn(1, 16)
        assert _relative(compiled(x, y), model(x, y)) < 1e-5


def test_a_batch_of_one_stays_symbolic():
    torch.manual_seed(0)
    model = AddBroadcast().eval()
    compiled = sfx.compile(model, (torch.randn(1, 16), torch.randn(1, 16)))
    x, y = torch.randn(5, 16), torch.randn(5, 16)
    assert _relative(compiled(x, y), model(x, y)) < 1e-5


def test_keyword_arguments_are_refused_with_what_the_model_takes():
    compiled = sfx.compile(nn.Linear(16, 4), torch.randn(4, 16))
    with pytest.raises(StructfxError, match=r"takes its tensor inputs positionally \(input\).*scale"):
        compiled(torch.randn(4, 16), scale=2.0)


def test_a_numpy_input_is_refused_naming_what_to_pass():
    compiled = sfx.compile(nn.Linear(16, 16).eval(), (torch.randn(4, 16),))
    with pytest.raises(StructfxError, match=r"input is a numpy.ndarray: pass a torch tensor \(or use "
                                            r"structfx.runtime.load for numpy arrays\)"):
        compiled(torch.randn(4, 16).numpy())
    with pytest.raises(StructfxError, match="input is a list: pass a torch tensor"):
        compiled([[0.0] * 16])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sfx.compile(lambda z: z * 2, (torch.randn(2, 4),)), "compile takes an nn.Module, got function"),
        (lambda: sfx.tune(lambda z: z * 2, (torch.randn(2, 4),)), "tune takes an nn.Module, got function"),
        (lambda: sfx.compile(nn.Linear(4, 4), 5), "compile's example_inputs must be a tensor or a tuple"),
        (lambda: sfx.compile(nn.Linear(4, 4), torch.randn(2, 4).numpy()), "convert numpy arrays"),
        (lambda: sfx.tune(nn.Linear(4, 4), torch.randn(2, 4), database=5), "database must be a directory path"),
        (lambda: sfx.compile(nn.Linear(4, 4), torch.randn(2, 4), database=5), "database must be a directory path"),
    ],
)
def test_entry_points_refuse_arguments_of_the_wrong_kind(call, message):
    with pytest.raises(StructfxError, match=message):
        call()


def test_a_database_that_is_not_one_fails_before_exporting(tmp_path, monkeypatch):
    import structfx.lowering.build as build

    def no_export(*args):
        raise AssertionError("compile exported before checking its database")

    monkeypatch.setattr(build, "export_for_compile", no_export)
    with pytest.raises(StructfxError, match="is not a structfx tuning database"):
        sfx.compile(nn.Linear(4, 4), torch.randn(2, 4), database=tmp_path / "missing")


class Dropping(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(self.fc(x))


def test_compile_warns_of_modules_in_training_mode_and_leaves_the_mode():
    torch.manual_seed(0)
    model, x = Dropping(), torch.randn(4, 16)
    with pytest.warns(UserWarning, match=r"compile runs the model in eval mode: module 'dropout' \(Dropout\) is in "
                                         r"training mode; call model.eval\(\) first"):
        compiled = sfx.compile(model, x)
    with pytest.warns(UserWarning, match=r"eval mode: module '1' \(Dropout\) is in training mode"):
        sfx.compile(nn.Sequential(nn.Linear(16, 16), nn.Dropout()), x)
    assert model.training and model.dropout.training
    with torch.no_grad():
        assert _relative(compiled(x), model.eval()(x)) < 1e-5  # the eval behaviour, as the warning says


def test_a_model_without_mode_dependent_modules_compiles_without_the_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compile runs the model in eval mode")
        sfx.compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4))  # in training mode, harmlessly


class Wrapper(nn.Module):
    """Not a transformers class, around one: no config of its own."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids, mask):
        return self.inner(ids, mask).last_hidden_state


def test_a_wrapper_keeps_the_sequence_dim_of_the_model_inside():
    from structfx.lowering.export import export_for_compile, input_specs
    from tests.lowering.zoo import ZOO

    entry = next(e for e in ZOO if e.name == "bert")
    program = export_for_compile(Wrapper(entry.build()), entry.inputs(2, 16))
    assert [(s.shape, s.bounds.get("sequence")) for s in input_specs(program)] == [
        (("batch", "sequence"), (1, 32)), (("batch", "sequence"), (1, 32))
    ]


def _causal_lm(name: str) -> nn.Module:
    import transformers

    shared = dict(vocab_size=100, use_cache=False)
    decoder = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=32, **shared)
    return {
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2,
                                                                              n_positions=32, **shared)),
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**decoder)),
        "falcon": lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, **shared)),
    }[name]()


class Logits(nn.Module):
    """A causal LM called with token ids and an attention mask, returning the logits."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).logits


def _tokens(batch: int, length: int, padded: int) -> tuple:
    ids = torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(batch * length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, :padded] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["gpt2", "llama", "falcon"])
def test_causal_lm_with_attention_mask(name):
    torch.manual_seed(0)
    model = Logits(_causal_lm(name)).eval()
    compiled = sfx.compile(model, _tokens(2, 8, 0))
    for batch, length, padded in ((1, 8, 0), (2, 8, 0), (3, 12, 2)):
        ids, mask = _tokens(batch, length, padded)
        with torch.no_grad():
            want = model(ids, mask)
        assert _relative(compiled(ids, mask), want) < 1e-5, f"batch {batch}, length {length}"


class Lookup(nn.Module):
    """An embedding of its ids input, and one of ids it computes (past the table for ids >= 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(10, 3)

    def forward(self, ids):
        return self.table(ids), self.table(ids + 4)


def test_ids_outside_the_table_are_refused_at_call_time_and_in_the_artifact(tmp_path):
    model = Lookup().eval()
    compiled = sfx.compile(model, torch.tensor([[1, 2]]))
    assert compiled.inputs[0].values == (0, 10)
    inside = torch.tensor([[0, 5], [5, 3]])
    assert torch.equal(compiled(inside)[0], model(inside)[0])
    for bad in (10, -1, 10**8):
        with pytest.raises(IndexError):
            model(torch.tensor([[1, bad]]))
        with pytest.raises(StructfxError, match=f"ids holds {bad}, outside the tensor it indexes"):
            compiled(torch.tensor([[1, bad]]))
    loaded = sfx.runtime.load(compiled.save(tmp_path / "lookup"))
    with pytest.raises(StructfxError, match="ids holds 10, outside"):
        loaded(torch.tensor([[1, 10]]).numpy())


def test_computed_ids_past_the_table_read_its_last_row_not_past_it():
    """TVM's take reads outside the table for such an id (garbage, or a segfault when far out)."""
    model = Lookup().eval()
    compiled = sfx.compile(model, torch.tensor([[1, 2]]))
    _, computed = compiled(torch.tensor([[1, 9]]))  # rows 5 and 13 of a 10-row table
    assert torch.equal(computed[0, 0], model.table.weight[5].detach())
    assert torch.equal(computed[0, 1], model.table.weight[9].detach())


def test_roberta_sequences_stop_where_its_offset_positions_end():
    """RoBERTa numbers positions from padding_idx + 1: a table of 40 rows serves 38 tokens."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           vocab_size=50, max_position_embeddings=40)
    model = RobertaModel(config).eval()
    compiled = sfx.compile(model, (torch.randint(3, 50, (2, 8)),))
    ids = torch.randint(3, 50, (1, 38))
    assert torch.allclose(compiled(ids)[0], model(ids).last_hidden_state, atol=1e-5)
    with pytest.raises(StructfxError, match="sequence must be from 1 to 38"):
        compiled(torch.randint(3, 50, (1, 39)))


DIVISIONS = {
    "floor_by_int": lambda x: torch.div(x, 2, rounding_mode="floor"),
    "trunc_by_int": lambda x: torch.div(x, 3, rounding_mode="trunc"),
    "floor_by_float": lambda x: torch.div(x, 1.5, rounding_mode="floor"),
    "int_floor": lambda x: torch.div(x.long(), 3, rounding_mode="floor"),
    "int_trunc_negative": lambda x: torch.div(x.long(), -3, rounding_mode="trunc"),
    "floordiv_operator": lambda x: x // 2,
}


class Division(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x):
        return DIVISIONS[self.name](x)


@pytest.mark.parametrize("name", sorted(DIVISIONS))
def test_division_by_a_python_scalar_with_a_rounding_mode(name):
    model, x = Division(name), torch.randn(4, 7, generator=torch.Generator().manual_seed(3)) * 10
    got, want = sfx.compile(model, x)(x), model(x)
    assert got.dtype == want.dtype and torch.equal(got, want)


class ReturnsNone(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x), None


def test_an_output_that_is_not_a_tensor_is_named():
    with pytest.raises(StructfxError, match=r"\[export\] ReturnsNone.forward returns None as its output 1"):
        sfx.compile(ReturnsNone().eval(), torch.randn(3, 4))
