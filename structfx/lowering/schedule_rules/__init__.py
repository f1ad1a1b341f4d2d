"""Schedule rules for TVM's own ops on the CPU (matmul, reductions, elementwise), dlight-style: one rule a
file, ``apply(func, target) -> Schedule | None``; ``structfx.lowering.schedules.schedule_rules_for`` orders them."""
