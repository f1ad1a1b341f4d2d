"""Every apache-tvm import structfx makes, in one place: a TVM upgrade touches this file only.

apache-tvm 0.27 renamed ``tvm.tir`` to ``tvm.tirx`` and moved schedules, dlight and MetaSchedule under
``tvm.s_tir``; targets are JSON dicts.
"""

import tvm
import tvm.sym
from tvm import relax, te, tirx, topi
from tvm.ir import TensorLoad
from tvm.ir.utils import derived_object
from tvm.relax.frontend import detach_params
from tvm.relax.frontend.torch import from_exported_program
from tvm.s_tir import MatchBufferRegion, SBlock, SBlockRealize, Schedule, dlight, meta_schedule, renew_defs
from tvm.s_tir.dlight import ScheduleRule
from tvm.s_tir.dlight.analysis import get_root_block, normalize_prim_func
from tvm.s_tir.schedule import ScheduleError
from tvm.support.tar import tar
from tvm.target import Target, codegen

from structfx.runtime.host import use_every_core

use_every_core()  # the importing thread's pool, for code that runs TVM functions directly (benchmarks, tools)

__all__ = [
    "MatchBufferRegion", "SBlock", "SBlockRealize", "Schedule", "ScheduleError", "ScheduleRule", "Target",
    "TensorLoad", "codegen", "derived_object", "detach_params", "dlight", "from_exported_program", "get_root_block",
    "meta_schedule", "normalize_prim_func", "relax", "renew_defs", "tar", "te", "tirx", "topi", "tvm",
]
