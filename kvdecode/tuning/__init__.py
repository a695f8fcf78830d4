"""The tuner behind ``kvdecode tune`` and the tables it writes.

Modules: :mod:`.environment` (what a table was measured with, and whether it matches this machine),
:mod:`.spec` (what to measure: families, batches, lengths; the dry-run estimate), :mod:`.search`
(candidate Triton configurations), :mod:`.measure` (steady-state timing of one point on the GPU),
:mod:`.crossover` (thresholds and the table from the measurements), :mod:`.runner` (the loop with progress,
partial writes and resume), :mod:`.table_schema` (reading a table file and checking every value when it
loads), :mod:`.tune_cmd`, :mod:`.plan_cmd` and :mod:`.info_cmd` (the ``tune`` and ``plan`` subcommands,
``info``'s rows).

The JSON tables themselves (``default_<gpu>.json``) ship in this folder; their schema is in
:mod:`kvdecode.thresholds`. Nothing here is imported by ``import kvdecode``.
"""
