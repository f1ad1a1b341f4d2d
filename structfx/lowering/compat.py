"""Every apache-tvm import structfx makes, in one place: a TVM upgrade touches this file only.

apache-tvm 0.27 renamed ``tvm.tir`` to ``tvm.tirx`` and moved schedules, dlight and MetaSchedule under
``tvm.s_tir``; targets are JSON dicts.
"""

from structfx.runtime.host import use_every_core

use_every_core()  # before TVM runs anything: its thread pool is sized once

import tvm  # noqa: E402
import tvm.sym  # noqa: E402
from tvm import relax, te, tirx, topi  # noqa: E402
from tvm.ir import TensorLoad  # noqa: E402
from tvm.ir.utils import derived_object  # noqa: E402
from tvm.relax.frontend import detach_params  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402
from tvm.s_tir import MatchBufferRegion, SBlock, SBlockRealize, Schedule, dlight, meta_schedule, renew_defs  # noqa: E402
from tvm.s_tir.dlight import ScheduleRule  # noqa: E402
from tvm.s_tir.dlight.analysis import get_root_block, normalize_prim_func  # noqa: E402
from tvm.s_tir.schedule import ScheduleError  # noqa: E402
from tvm.support.tar import tar  # noqa: E402
from tvm.target import Target, codegen  # noqa: E402

__all__ = [
    "MatchBufferRegion", "SBlock", "SBlockRealize", "Schedule", "ScheduleError", "ScheduleRule", "Target",
    "TensorLoad", "codegen", "derived_object", "detach_params", "dlight", "from_exported_program", "get_root_block",
    "meta_schedule", "normalize_prim_func", "relax", "renew_defs", "tar", "te", "tirx", "topi", "tvm",
]
