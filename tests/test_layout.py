"""The direction of dependencies: ``encoder`` is the library at the bottom and imports nothing
else of the project; ``jobs`` (the queue's contract) sits on it; the producer and the worker
depend on those two and never on each other; the command line is on top and nothing
imports it; the benchmark depends on the product and the tests' harness, and nothing
imports it.  Checked on the source (every import statement, including those inside
functions) and, for ``imgenc encode``, on what a real run loads."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers import REPO, write_jpegs

PACKAGES = ("encoder", "jobs", "producer", "worker", "search", "imgenc", "bench", "tests")


def project_imports() -> dict[str, set[str]]:
    """Top-level package -> the other project packages its modules import."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        folder = REPO / package
        if not folder.is_dir():
            continue
        found = graph.setdefault(package, set())
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                found.update(n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES)
        found.discard(package)
    return graph


GRAPH = project_imports()


def test_the_encoder_library_imports_no_other_package_of_the_project():
    assert GRAPH["encoder"] == set()


def test_the_queue_contract_depends_on_the_encoder_only():
    assert GRAPH["jobs"] == {"encoder"}


def test_producer_and_worker_depend_on_encoder_and_the_contract_never_on_each_other():
    assert GRAPH["producer"] <= {"encoder", "jobs"} and "jobs" in GRAPH["producer"]
    # The worker also uses the search library, to fit a job's near-duplicate threshold.
    assert GRAPH["worker"] <= {"encoder", "jobs", "search"}


def test_the_query_half_depends_on_the_encoder_only():
    assert GRAPH["search"] == {"encoder"}


def test_nothing_imports_the_command_line():
    assert [p for p, deps in GRAPH.items() if "imgenc" in deps and p != "tests"] == []


def test_the_benchmark_shares_the_tests_harness_and_nothing_imports_it():
    # bench starts its services with tests.helpers (one harness); no package imports bench.
    assert [p for p, deps in GRAPH.items() if "bench" in deps] == []
    assert "tests" in GRAPH["bench"] and "imgenc" not in GRAPH["bench"]


def test_there_is_no_cycle_between_top_level_packages():
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in GRAPH.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    assert [p for p in GRAPH if reaches(p, p, {p})] == []


@pytest.mark.parametrize("package", ["encoder", "jobs", "producer", "worker"])
def test_the_layout_check_sees_real_imports(package):
    # Guard against a checker that finds nothing: each of these imports something.
    assert package == "encoder" or GRAPH[package]


def test_imgenc_encode_imports_neither_celery_nor_the_keras_extras_it_never_uses(tmp_path):
    """An embedded encode loads no queue code, and Keras's optional SciPy, scikit-learn
    and matplotlib stay unloaded (a third of TensorFlow's import), yet remain importable
    afterwards.  (pandas, where installed, is loaded by pyarrow's first array, for the
    manifest's Parquet file: 0.3 CPU-s; pyarrow offers no way to keep it out.)"""
    write_jpegs(tmp_path / "images", 2)
    script = (
        "import sys; from imgenc.cli import main;"
        "code = main(['encode', sys.argv[1], '--out', sys.argv[2], '--backbone', 'stub',"
        " '--weights', 'random', '--no-progress']);"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'celery', 'kombu', 'redis',"
        " 'producer', 'worker', 'jobs', 'scipy', 'sklearn', 'matplotlib'});"
        "import pandas, scipy.sparse, sklearn.linear_model, matplotlib;"
        "print(code, 'keras' in sys.modules, loaded)"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "images"), str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-3:] == ["0", "True", "[]"], run.stdout


def module_imports() -> dict[str, set[str]]:
    """Module -> the product modules it imports (statements anywhere, functions included)."""
    product = [p for p in PACKAGES if p not in ("tests", "bench")]
    modules = {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
        for package in product
        for path in (REPO / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
    return graph


def test_no_import_cycle_between_modules_counting_imports_inside_functions():
    graph = module_imports()
    # The checker sees an import inside a function (encode_folder's, of the runtime).
    assert "encoder.runtime" in graph["encoder.folder_run"]

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, graph) if c]
    assert cycles == [], cycles[0]
