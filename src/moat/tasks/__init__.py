"""What MOAT is used for, one package per task: `classification`, `segmentation` and
`detection`, each split into model, inference, metrics, drawing, typed options (`options.py`),
the training loop's task (`task.py`) and `moat demo` (`demo.py`). Shared by them:
`backbone.py` (the MOAT backbone of the dense tasks), `confusion.py` (confusion matrix and
report) and `options.py` (the typed `task_options` machinery).

Nothing is imported here: `moat.tasks.base.get_task` imports the task packages when a task
is asked for by name, and each registers itself.
"""
