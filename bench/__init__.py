"""The Orchestrix benchmark: real servers, real service processes, measured end to end.

Run it with ``make bench`` (or ``python -m bench --help``). Each phase lives in
its own module; :mod:`bench.infra` starts and stops everything they use, and
:mod:`bench.report` prints the table and writes the JSON.
"""
