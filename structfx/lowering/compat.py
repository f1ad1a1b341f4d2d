"""Every apache-tvm import structfx makes, in one place: a TVM upgrade touches this file only.

apache-tvm 0.27 renamed ``tvm.tir`` to ``tvm.tirx`` and moved schedules, dlight and MetaSchedule under
``tvm.s_tir``; targets are JSON dicts.
"""

import tvm
from tvm import relax, te, tirx
from tvm.ir.utils import derived_object
from tvm.relax.frontend import detach_params
from tvm.relax.frontend.torch import from_exported_program
from tvm.s_tir import Schedule, dlight, meta_schedule
from tvm.s_tir.dlight import ScheduleRule
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.support.tar import tar
from tvm.target import Target, codegen

__all__ = [
    "Schedule", "ScheduleRule", "Target", "codegen", "derived_object", "detach_params", "dlight",
    "from_exported_program",
    "meta_schedule", "normalize_prim_func", "relax", "tar", "te", "tirx", "tvm",
]
