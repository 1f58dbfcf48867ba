"""Airflow workers that import the stages' libraries once, before they fork their tasks: an edge (it imports
Airflow), named in Airflow's configuration, never imported by the core.

Airflow 3 forks each task from its worker (the Task SDK's supervisor, ``os.fork``), and a Flywheel task forks
its stage runner from itself (flywheel/orchestration.py ``stage_runner``), so torch, transformers, MLflow and GX
imported here are paid once per worker instead of once per stage, and the stage still runs inside its task's
process tree (its timeout and kill reach it). Only third-party libraries: the project's modules are imported
by each task, so a code change is seen by the next one.

- LocalExecutor (``make airflow``): ``AIRFLOW__CORE__EXECUTOR=flywheel.airflow_worker.PreloadingLocalExecutor``;
- Celery workers: ``AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS=flywheel.airflow_worker.CELERY_CONFIG`` (Airflow's
  default Celery configuration, with a ``worker_init`` handler that preloads in the worker's main process
  before it forks its pool).
"""

from __future__ import annotations

import logging

from airflow.executors.local_executor import LocalExecutor
from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
from celery.signals import worker_init

from flywheel.warm_runner import preload_worker

log = logging.getLogger(__name__)


def preload() -> None:
    log.info(
        "preloaded the stages' libraries in %.1f s (they are shared by the tasks forked from here)", preload_worker()
    )


class PreloadingLocalExecutor(LocalExecutor):
    """Airflow's LocalExecutor whose workers (forked from the scheduler when it starts) hold the preloaded
    libraries: the scheduler's memory grows by theirs (650 MB resident measured), shared copy-on-write with its
    workers."""

    def start(self) -> None:
        if self.is_mp_using_fork:  # a spawned worker would import them again for nothing
            preload()
        super().start()


@worker_init.connect(weak=False)
def _preload_celery_worker(**_kwargs) -> None:
    preload()


CELERY_CONFIG = dict(DEFAULT_CELERY_CONFIG)
