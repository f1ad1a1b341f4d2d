"""compile() on forwards that write their inputs or their buffers: after every call the caller's tensors
hold what eager PyTorch leaves in them, the outputs are eager's, and the compiled model carries its own
copy of the updated buffers across calls as the eager model would; an aliasing it cannot honour is refused.
Each case is checked against eager on fresh copies of the same inputs, at two batch sizes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structfx as sfx


class Forward(nn.Module):
    """A module whose forward is ``function`` (of any number of tensors)."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, *args):
        return self.function(*args)


def _add_(x):
    x.add_(1)
    return x * 2


def _mul_(x, y):
    y.mul_(x)
    return x + y


def _copy_(x, y):
    x.copy_(y * 3)
    return y.sum(1)


def _assign_first_row(x):
    x[0] = 7.0
    return x.sum(1)


def _add_to_columns(x):
    x[:, 1:] += x[:, :1]
    return x.mean(1)


def _relu_(x):
    torch.relu_(x)
    return x + 1


def _functional_inplace_relu(x):
    return F.relu(x, inplace=True) * 3


def _inplace_relu_module(x):
    return nn.ReLU(inplace=True)(x) - 1


def _through_a_view(x):
    x[:, :2].mul_(-1)
    x.t()[1].sub_(0.5)
    return x.sum(1)


def _returns_its_input(x):
    x.sigmoid_()
    return x


def _int_counts(x, counts):
    counts.add_((x > 0).long() * 2)
    return x * 2


def _bool_mask(x, mask):
    mask[:, 0] = True
    mask.logical_not_()
    return x.masked_fill(mask, 0.0)


def _out_argument(x, y):
    torch.mul(x, 3, out=y)
    return x - y


def _masked_fill_(x):
    x.masked_fill_(x < 0, 0.5)
    return x.sum(1)


def _second_and_third_of_three(x, y, z):
    y.sub_(x)
    z.clamp_(min=0)
    return x * y + z


CASES = {
    "add_": (_add_, [torch.float32]),
    "mul_ of one of two": (_mul_, [torch.float32, torch.float32]),
    "copy_": (_copy_, [torch.float32, torch.float32]),
    "x[0] = v": (_assign_first_row, [torch.float32]),
    "x[:, 1:] += ...": (_add_to_columns, [torch.float32]),
    "torch.relu_": (_relu_, [torch.float32]),
    "F.relu(inplace=True)": (_functional_inplace_relu, [torch.float32]),
    "nn.ReLU(inplace=True)": (_inplace_relu_module, [torch.float32]),
    "through views": (_through_a_view, [torch.float32]),
    "returns its input": (_returns_its_input, [torch.float32]),
    "int64 input": (_int_counts, [torch.float32, torch.int64]),
    "bool input": (_bool_mask, [torch.float32, torch.bool]),
    "two of three": (_second_and_third_of_three, [torch.float32] * 3),
    "out=": (_out_argument, [torch.float32, torch.float32]),
    "masked_fill_": (_masked_fill_, [torch.float32]),
}


def _inputs(dtypes, batch: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    made = []
    for dtype in dtypes:
        if dtype == torch.bool:
            made.append(torch.rand(batch, 4, generator=generator) > 0.5)
        elif dtype == torch.int64:
            made.append(torch.randint(-5, 5, (batch, 4), generator=generator))
        else:
            made.append(torch.randn(batch, 4, generator=generator, dtype=dtype))
    return made


@pytest.mark.parametrize("case", list(CASES))
def test_written_inputs_hold_what_eager_leaves_in_them(case):
    function, dtypes = CASES[case]
    model = Forward(function)
    example = _inputs(dtypes, 3, 0)
    kept = [t.clone() for t in example]
    compiled = sfx.compile(model, tuple(example))
    assert all(torch.equal(a, b) for a, b in zip(example, kept)), "compile changed the example inputs"
    for batch, seed in ((3, 1), (5, 2)):
        eager_in, compiled_in = _inputs(dtypes, batch, seed), _inputs(dtypes, batch, seed)
        want = model(*eager_in)
        got = compiled(*compiled_in)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for position, (c, e) in enumerate(zip(compiled_in, eager_in)):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=f"input {position} after the call")


def test_a_non_contiguous_written_input_is_written_through_its_strides():
    model = Forward(_add_to_columns)
    compiled = sfx.compile(model, torch.randn(3, 4))
    base_eager, base_compiled = torch.randn(4, 3), None
    base_compiled = base_eager.clone()
    want = model(base_eager.t())
    got = compiled(base_compiled.t())
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(base_compiled, base_eager)


class Optional(nn.Module):
    """A second input with a default, given as a keyword in eager code: an accumulator the forward fills."""

    def forward(self, x, total=None):
        total.add_(x.sum(0))
        return x - total


def test_a_keyword_input_that_is_written_is_passed_positionally_and_written():
    model = Optional()
    compiled = sfx.compile(model, (torch.randn(3, 4), torch.zeros(4)))
    eager_total, compiled_total = torch.zeros(4), torch.zeros(4)
    for seed in range(3):
        x = torch.randn(2 + seed, 4, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(compiled(x, compiled_total), model(x, total=eager_total))
        torch.testing.assert_close(compiled_total, eager_total)
    with pytest.raises(sfx.StructfxError, match=r"positionally \(x, total\)"):
        compiled(x, total=compiled_total)


class Scaled(nn.Module):
    def forward(self, x, y):
        return _mul_(x, y)


def test_the_same_tensor_as_two_arguments_is_refused_when_one_is_written():
    model = Scaled()
    x = torch.randn(3, 4)
    compiled = sfx.compile(model, (x, x))  # torch.export cannot take aliased inputs that are written
    with pytest.raises(sfx.StructfxError, match=r"y and x share memory.*writes y in place.*x\.clone\(\)"):
        compiled(x, x)
    whole = torch.randn(3, 8)
    with pytest.raises(sfx.StructfxError, match="share memory"):
        compiled(whole[:, :4], whole[:, 2:6])
    a = torch.randn(3, 8)
    b = a.clone()
    want = model(a[:, :4], a[:, 4:])  # disjoint halves of one tensor: no aliasing
    torch.testing.assert_close(compiled(b[:, :4], b[:, 4:]), want)
    torch.testing.assert_close(b, a)


def test_the_same_tensor_as_two_arguments_that_are_only_read_is_taken():
    model = Forward(lambda x, y: x * y)
    x = torch.randn(3, 4)
    torch.testing.assert_close(sfx.compile(model, (x, x))(x, x), x * x)


class Counting(nn.Module):
    """A call counter, a running mean (updated in place and by reassignment) and a parameter updated under
    no_grad."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("n", torch.zeros((), dtype=torch.int64))
        self.register_buffer("running", torch.ones(4))
        self.register_buffer("scale", torch.ones(4), persistent=False)
        self.shift = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        self.n += 1
        self.running.mul_(0.5).add_(x.mean(0))
        self.scale = self.scale * 1.5
        with torch.no_grad():
            self.shift.sub_(0.25)
        return self.fc(x) * self.scale + self.running + self.n + self.shift


def test_updated_buffers_are_the_compiled_models_own_state_across_calls():
    torch.manual_seed(0)
    model = Counting().eval()
    before = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    compiled = sfx.compile(model, torch.randn(3, 4))
    assert all(torch.equal(v, dict([*model.named_parameters(), *model.named_buffers()])[k]) for k, v in before.items())
    assert sorted(compiled.state) == ["n", "running", "scale", "shift"]
    for seed in range(4):
        x = torch.randn(2 + seed, 4, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(compiled(x), want)
        for name, value in compiled.state.items():
            torch.testing.assert_close(value, model.get_parameter(name) if name == "shift" else model.get_buffer(name))
    assert int(compiled.state["n"]) == 4 and compiled.state["n"].dtype == torch.int64


def test_a_written_leaf_that_requires_grad_is_refused_as_eager_refuses_it():
    model = Forward(_add_)
    compiled = sfx.compile(model, torch.randn(3, 4))
    leaf = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        model(leaf)
    with pytest.raises(sfx.StructfxError, match=r"args_0 is a leaf tensor that requires grad.*torch\.no_grad"):
        compiled(leaf)
    with torch.no_grad():
        eager_leaf, compiled_leaf = leaf.detach().clone().requires_grad_(), leaf.detach().clone().requires_grad_()
        torch.testing.assert_close(compiled(compiled_leaf), model(eager_leaf))
    torch.testing.assert_close(compiled_leaf, eager_leaf)


class InputRelu(nn.Module):
    """A ReLU in place on the input, whose new value is read again (a residual), and on a view of a Linear output."""

    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.ReLU(inplace=True)

    def forward(self, x):
        self.act(x)
        h = self.fc(x)
        torch.relu_(h[:, :4])
        return h + x


def test_a_transformed_model_that_writes_its_input_compiles_to_the_same_writes():
    torch.manual_seed(0)
    model = InputRelu().eval()
    example = torch.randn(3, 8)
    small = sfx.transform(model, [sfx.MaxPlus(k=2, min_features=1)], example_inputs=(example.clone(),))
    assert sum(isinstance(m, sfx.SparseMaxPlus) for m in small.modules()) == 2
    compiled = sfx.compile(small, example)
    for batch in (3, 6):
        x = torch.randn(batch, 8, generator=torch.Generator().manual_seed(batch))
        eager_x, compiled_x = x.clone(), x.clone()
        with torch.no_grad():
            want = model(eager_x)
        torch.testing.assert_close(compiled(compiled_x), want, rtol=1e-5, atol=1e-6)
        assert torch.equal(compiled_x, eager_x)  # max-plus with init="relu" is exactly ReLU


class Unregistered(nn.Module):
    """A plain tensor attribute (not a buffer) written in place."""

    def __init__(self):
        super().__init__()
        self.seen = torch.zeros(4)

    def forward(self, x):
        self.seen.add_(x.sum(0))
        return x + self.seen


def test_a_written_tensor_attribute_that_is_not_a_buffer_is_refused_with_the_fix():
    with pytest.raises(sfx.StructfxError, match=r"\[export\] forward writes the tensor attribute 'seen'.*register_buf"):
        sfx.compile(Unregistered(), torch.randn(3, 4))
    model = Unregistered()
    with pytest.raises(sfx.StructfxError):
        sfx.compile(model, torch.randn(3, 4))
    assert torch.equal(model.seen, torch.zeros(4)), "compile's eager check left its write in the model"
