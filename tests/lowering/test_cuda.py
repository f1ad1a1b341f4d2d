"""CUDA builds: every op compiles here (nvcc, no GPU needed) and the generated code does what the
schedules promise. Numerics run only where a GPU is present."""

import re

import pytest
import torch

import structfx as sfx
from structfx.lowering.compat import tvm
from structfx.nn import BTTLinear, SPMLinear
from tests.cases import CASES

HAS_GPU = tvm.cuda(0).exist
#: This machine's GPU where there is one (its arch detected), else the H100/H200's.
TARGET = "cuda" if HAS_GPU else "cuda -arch=sm_90"


def _compiled(case, target=TARGET):
    module = case.make().float().eval()
    return module, sfx.compile(module, case.inputs(5).float(), target=target)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_op_compiles_for_cuda(case):
    _, compiled = _compiled(case)
    source = compiled.device_source()
    assert all(f"{kernel}_kernel" in source for kernel in compiled.kernels)


def test_spm_runs_every_stage_in_one_kernel_from_shared_memory():
    layer = SPMLinear(256, 256).eval()
    source = sfx.compile(layer, torch.randn(4, 256), target=TARGET).device_source()
    body = source[source.rindex("structfx_spm_kernel("):]
    assert source.count("structfx_spm_kernel(") == 2  # declared and defined once: one kernel, all 8 stages
    assert re.findall(r"structfx_spm_kernel_\d", source) == []  # no per-stage kernels
    assert "__shared__" in body and body.count("__syncthreads()") >= layer.stages


def test_btt_stages_operands_through_shared_memory():
    source = sfx.compile(BTTLinear(256, 256, rank=2).eval(), torch.randn(4, 256), target=TARGET).device_source()
    assert "__shared__" in source[source.index("structfx_btt_kernel"):]


def test_transformed_digits_mlp_compiles_for_cuda():
    from structfx.demo import build_models, load_data

    data = load_data()
    small = sfx.transform(build_models()["dense (ReLU)"], [sfx.BTT(rank=2), sfx.MaxPlus()],
                          example_inputs=(data.x_test[:8],))
    compiled = sfx.compile(small, data.x_test[:8], target=TARGET)
    assert {"structfx_btt", "structfx_sparse_maxplus"} <= set(compiled.kernels)


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the build runs instead (test_cuda_numerics)")
def test_running_a_cuda_build_without_a_gpu_is_a_clear_error():
    compiled = sfx.compile(BTTLinear(16, 16).eval(), torch.randn(4, 16), target=TARGET)
    with pytest.raises(sfx.StructfxError, match="no cuda device is present.*compile with target='llvm'"):
        compiled(torch.randn(4, 16))


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: 'cuda' takes its arch")
def test_cuda_without_an_arch_or_a_gpu_to_detect_it_from_is_refused():
    with pytest.raises(sfx.StructfxError, match="names no architecture.*e.g. 'cuda -arch=sm_90'"):
        sfx.compile(BTTLinear(16, 16).eval(), torch.randn(4, 16), target="cuda")


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU on this machine to detect an arch from")
def test_cuda_takes_the_arch_of_this_machines_gpu():
    from structfx.lowering.target import resolve_target

    assert resolve_target("cuda").attrs["arch"] == "sm_" + tvm.cuda(0).compute_version.replace(".", "")


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU on this machine: numerics need one")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cuda_numerics(case):
    module, compiled = _compiled(case)
    x = case.inputs(33).float()
    with torch.no_grad():
        want = module(x)
    assert float((compiled(x) - want).norm() / want.norm()) < 1e-4


def test_channel_maxplus_is_one_kernel_on_the_map_for_cuda():
    layer = sfx.nn.ChannelMaxPlus(16, 16, k=2, init="paper").eval()
    compiled = sfx.compile(layer, torch.randn(2, 16, 7, 9), target=TARGET)
    assert list(compiled.kernels) == ["structfx_channel_maxplus"]
    assert "structfx_channel_maxplus_kernel" in compiled.device_source()
