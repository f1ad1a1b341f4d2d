"""The built-in ops, one ``register_op`` each: every fact structfx keeps about an op is in its record here.

Adding an op (README, "Adding an op"): write ``structfx/nn/<op>.py`` (layer + custom op),
``structfx/passes/rules/<op>.py`` (rule + build + cost), ``structfx/lowering/ops/<op>.py`` (TE compute,
converter, schedule rules), then one record below. Registration order is the schedule rules' order.
"""

from structfx.registry import OpCase, OpSpec, register_op

register_op(OpSpec(
    name="maxplus",
    custom_op="structfx::sparse_maxplus",
    layers=("structfx.nn.maxplus:SparseMaxPlus", "structfx.nn.maxplus:ChannelMaxPlus"),
    rule="structfx.passes.rules.maxplus:MaxPlus",
    build="structfx.passes.rules.maxplus:relu_to_maxplus",
    cost="structfx.passes.rules.maxplus:maxplus_cost",
    converter="structfx.lowering.ops.maxplus:convert_maxplus",
    schedules=("structfx.lowering.ops.maxplus:MaxPlusCPU", "structfx.lowering.ops.maxplus:MaxPlusCUDA",
               "structfx.lowering.ops.channel_maxplus:ChannelMaxPlusCPU",
               "structfx.lowering.ops.channel_maxplus:ChannelMaxPlusCUDA"),
    cases=(
        OpCase("maxplus_37x23_k3", (37, 23), {"k": 3}, (37,)),
        OpCase("maxplus_16x16_relu", (16, 16), {"k": 2, "init": "relu"}, (16,)),
        OpCase("maxplus_13x29_nobias", (13, 29), {"k": 4, "bias": False}, (13,)),
        OpCase("maxplus_dense_7x5", (7, 5), {"k": 7}, (7,)),
    ),
))

register_op(OpSpec(
    name="maxplus_pool",
    custom_op="structfx::maxplus_pool2d",
    layers=("structfx.nn.maxplus_pool:MaxPlusPool2d",),
    rule="structfx.passes.rules.maxplus_pool:MaxPlusPool",
    build="structfx.passes.rules.maxplus_pool:pool_to_maxplus",
    cost="structfx.passes.rules.maxplus_pool:pool_cost",
    converter="structfx.lowering.ops.maxplus_pool:convert_maxplus_pool",
    schedules=("structfx.lowering.ops.maxplus_pool:MaxPlusPoolCPU",
               "structfx.lowering.ops.maxplus_pool:MaxPlusPoolCUDA"),
    cases=(
        OpCase("pool_3x3_s2_p1_ceil", (3, 3, 2, 1), {"ceil_mode": True}, (3, 9, 10), {"se": (-1.0, 1.0)}),
        OpCase("pool_2x3_dil2", (2, (2, 3), (1, 2), (1, 0)), {"dilation": 2}, (2, 7, 8), {"se": (-1.0, 1.0)}),
    ),
))

_SPM_REDRAW = {"d_in": (0.5, 1.5), "d_out": (0.5, 1.5), "bias": (-1.0, 1.0)}

register_op(OpSpec(
    name="spm",
    custom_op="structfx::spm",
    layers=("structfx.nn.spm:SPMLinear",),
    rule="structfx.passes.rules.spm:SPM",
    build="structfx.passes.rules.spm:dense_to_spm",
    prefit="structfx.passes.rules.spm:fit_together",
    cost="structfx.passes.rules.spm:spm_cost",
    converter="structfx.lowering.ops.spm:convert_spm",
    schedules=("structfx.lowering.ops.spm:SPMCPU", "structfx.lowering.ops.spm:SPMCoefficientsCPU",
               "structfx.lowering.ops.spm:SPMCUDA"),
    cases=(
        OpCase("spm_orth_37x23", (37, 23), {}, (37,), _SPM_REDRAW),
        OpCase("spm_general_16x31", (16, 31), {"variant": "general"}, (16,), _SPM_REDRAW),
        OpCase("spm_random_20x20", (20, 20), {"pairing": "random"}, (20,), _SPM_REDRAW),
        OpCase("spm_orth_8x8_2L_nobias", (8, 8), {"stages": 6, "bias": False}, (8,), _SPM_REDRAW),
    ),
))

register_op(OpSpec(
    name="btt",
    custom_op="structfx::btt",
    layers=("structfx.nn.btt:BTTLinear",),
    rule="structfx.passes.rules.btt:BTT",
    build="structfx.passes.rules.btt:dense_to_btt",
    cost="structfx.passes.rules.btt:btt_cost",
    converter="structfx.lowering.ops.btt:convert_btt",
    schedules=("structfx.lowering.ops.btt:BTTCPU", "structfx.lowering.ops.btt:BTTCUDA"),
    cases=(
        OpCase("btt_r1_36x24", (36, 24), {"rank": 1}, (36,), {"bias": (-1.0, 1.0)}),
        OpCase("btt_r3_17x13", (17, 13), {"rank": 3}, (17,), {"bias": (-1.0, 1.0)}),
        OpCase("btt_r2_64x48_nobias", (64, 48), {"rank": 2, "bias": False}, (64,), {"bias": (-1.0, 1.0)}),
    ),
))
