"""`forcelab distill CONFIG [override ...] [--resume latest|PATH] [--dry-run] [--print-config]`

The distillation recipes (every Recipe in distill/, e.g. ode_init, self_forcing) on the same
trainer as `forcelab train`; also
`accelerate launch -m forcelab.distill CONFIG ...`. Teacher, critic and student weights are
given as paths (roles.teacher.init=...): Wan / diffusers directories or forcelab runs. A
stage starts from another stage's weights only - never its step, optimizer or LoRA state.
"""

from ..train.cli import INTERMIXED_ARGS, add_arguments, run  # noqa: F401  (one implementation of the command)
