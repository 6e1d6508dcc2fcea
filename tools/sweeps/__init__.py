"""Sweeps: the grid of a paper's results table (methods x tasks x seeds x class orders) from
one sweep file, run by ``tools/sweep.py`` (``docs/sweeps.md``).

One concern per module:

* ``spec``: the sweep file (TOML): reading and checking it, one ``error:`` line per mistake;
* ``plan``: the grid expanded into named runs, the shared step-0 runs, the ``run.py``
  commands of each, and what is finished;
* ``lock``: a lock per run folder, so that two sweeps sharing runs never train one twice;
* ``jobs``: running one run's commands under its lock (in this process, or as the callable
  that a submitit job runs), with a record of the last attempt;
* ``executors``: side by side here (``--jobs``), or through submitit (SLURM, local, debug),
  with a progress bar over the whole grid;
* ``report``: ``status`` and ``table``.
"""
