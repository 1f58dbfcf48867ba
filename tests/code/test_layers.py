"""The layers import one way (ARCHITECTURE.md): edges (the CLI, the DAGs, the service) -> steps (pipelines/) ->
the core library (flywheel/ but its CLI). Read from the source with ast: the core imports no step and no edge,
a step imports no edge and no Airflow, nothing imports a DAG, benchmarks import nothing from tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EDGE_IN_CORE = ("flywheel/cli", "flywheel/launch.py")  # the command line lives in the flywheel package
# Airflow's side of the preloading workers, named in Airflow's configuration: an edge with the DAGs' rules
AIRFLOW_EDGE_IN_CORE = "flywheel/airflow_worker.py"


def _layer(rel: str) -> str | None:
    if rel.startswith(EDGE_IN_CORE):
        return "cli"
    if rel == AIRFLOW_EDGE_IN_CORE:
        return "dags"
    for prefix, layer in (
        ("flywheel/", "core"),
        ("pipelines/", "steps"),
        ("service/", "service"),
        ("dags/", "dags"),
        ("benchmarks/", "benchmarks"),
    ):
        if rel.startswith(prefix):
            return layer
    return None


def _module_layer(module: str) -> str | None:
    path = module.replace(".", "/")
    if module == "flywheel.cli" or module.startswith(("flywheel.cli.", "flywheel.launch")):
        return "cli"
    if module.startswith("flywheel.airflow_worker"):
        return "dags"
    top = module.split(".")[0]
    return (
        {
            "flywheel": "core",
            "pipelines": "steps",
            "service": "service",
            "dags": "dags",
            "tests": "tests",
            "airflow": "airflow",
        }.get(top)
        if path
        else None
    )


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


FORBIDDEN = {
    "core": {"steps", "service", "dags", "cli", "airflow", "tests"},
    "steps": {"service", "dags", "cli", "airflow", "tests"},
    "service": {"dags", "cli", "tests"},
    "cli": {"dags", "tests"},
    "dags": {"cli", "tests"},
    "benchmarks": {"tests", "dags"},
}


def _violations() -> list[str]:
    found = []
    for path in sorted(ROOT.glob("**/*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith((".venv/", "tests/", "benchmarks/out/")) or "/." in rel:  # out/: benchmarks' workspaces
            continue
        layer = _layer(rel)
        if layer is None:
            continue
        for module in _imports(path):
            target = _module_layer(module)
            if target in FORBIDDEN[layer] and not (layer == "cli" and module.startswith("flywheel.cli")):
                found.append(f"{rel} ({layer}) imports {module} ({target})")
    return sorted(set(found))


def test_imports_go_one_way():
    assert _violations() == []


@pytest.mark.parametrize(
    "source,module,expected",
    [
        ("flywheel/registry.py", "pipelines.evaluate", "core imports steps"),
        ("pipelines/evaluate.py", "service.app", "steps imports service"),
        ("flywheel/data/ingest.py", "flywheel.cli", "core imports cli"),
        ("benchmarks/bench_x.py", "tests.conftest", "benchmarks imports tests"),
        ("flywheel/orchestration.py", "flywheel.airflow_worker", "core imports the Airflow edge"),
        ("flywheel/airflow_worker.py", "tests.conftest", "the Airflow edge imports tests"),
    ],
)
def test_the_rule_sees_an_import_that_climbs(source, module, expected):
    layer, target = _layer(source), _module_layer(module)
    assert target in FORBIDDEN[layer], expected
