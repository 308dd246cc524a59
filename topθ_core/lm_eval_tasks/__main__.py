"""``python -m topθ_core.lm_eval_tasks``: print the folder for lm-eval's ``--include_path``."""

from . import TASKS_DIR

print(TASKS_DIR)
