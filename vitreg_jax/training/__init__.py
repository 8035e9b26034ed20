"""The training machinery (as scenic's `train_lib`): the loop and its hooks, the train state
and jitted steps, the objective, optimizers, evaluation, checkpoints, the run directory and
the logs. `python -m vitreg_jax.main` runs `train.train_and_evaluate`.

Docstring only: `run_files` (the workdir layout) is imported by jax-free code (sweep, the
reports), so importing this package must not import jax.
"""
