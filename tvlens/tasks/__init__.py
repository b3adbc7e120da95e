"""Tasks: built-in and user-supplied (input, output) pairs with seeded splits."""

from tvlens.tasks.builtin import builtin_task, builtin_task_names, load_task
from tvlens.tasks.task import Pair, Task, load_task_file

__all__ = ["Pair", "Task", "builtin_task", "builtin_task_names", "load_task", "load_task_file"]
