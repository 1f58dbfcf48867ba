"""Helpers shared by tests and benchmarks: throwaway workspaces, Airflow homes.

Development only (not installed with the package; importable from the repository root, where pytest and the
benchmarks run). ``devkit.workspaces`` makes a copy of the repository on the tiny profile with a small batch
ingested and the base models built; ``devkit.airflow_home`` gives it an Airflow of its own and runs a DAG with
``dag.test()`` (``devkit/dagrun.py``, in a subprocess)."""
