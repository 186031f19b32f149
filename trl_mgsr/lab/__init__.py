"""The distillation lab: procedurally generated tasks with checkers, cached teacher and student, metrics.

`benchmarks/lab/run.py` runs every method on it; `trl-mgsr demo` uses it for GKD against MGSR.
"""

from .metrics import evaluate_student
from .models import ModelSettings, eval_rows
from .runner import Budget, Method, distill, prepare_models
from .tasks import TASKS, Task

__all__ = ["Budget", "Method", "ModelSettings", "TASKS", "Task", "distill", "eval_rows", "evaluate_student",
           "prepare_models"]
