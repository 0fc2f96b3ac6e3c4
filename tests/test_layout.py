"""The house stays walkable: no import circles between the project's modules, and models never import workers."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "comfyhub", "comfysim", "ops", "servers", "tasks")
# The supervisor and its pieces: what holds upstream sockets and runs in the workers.
WORKERS = {
    "servers.supervisor", "servers.connection", "servers.link", "servers.tracking", "servers.sending",
    "servers.reconcile", "servers.health", "servers.completion", "servers.webhooks",
}  # fmt: skip


def modules():
    """{dotted module name: path} of every Python module of the project (migrations and tests aside)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def runtime_nodes(tree):
    """Every node of the tree but those under `if TYPE_CHECKING:` (imports for annotations never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imports(path, known):
    """The project modules `path` imports when it runs, at the top or inside a function."""
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            # `from servers import pool` names the module servers.pool; `import servers.models` the module itself.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph():
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def cycles(edges):
    """Every strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def package_of(module):
    return module.split(".")[0]


def test_the_project_has_no_import_circle():
    edges = graph()
    # A package's __init__ re-exporting its own modules is not a circle between modules.
    edges = {
        name: {target for target in targets if not (name == package_of(target) and "." not in name)}
        for name, targets in edges.items()
    }
    assert cycles(edges) == []


def test_models_and_request_handlers_never_import_the_supervisor():
    edges = graph()
    kinds = {"models", "views", "api", "consumers", "submission", "forms", "progress"}
    handlers = [name for name in edges if kinds & set(name.split(".")[1:])]  # tasks.models.task is a model too
    for name in handlers:
        reached, todo = set(), [name]
        while todo:
            for target in edges.get(todo.pop(), ()):
                if target not in reached:
                    reached.add(target)
                    todo.append(target)
        assert not reached & WORKERS, f"{name} reaches {sorted(reached & WORKERS)}"


def test_the_circle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    code = (
        "import importlib, sys, django, os\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'comfyhub.settings')\n"
        "django.setup()\n"
        "importlib.import_module(sys.argv[1])\n"
    )
    for name in sorted(WORKERS | {"servers.recovery", "servers.consistency", "servers.pool", "tasks.models",
                                  "tasks.models.task", "tasks.submission", "servers.wake", "servers.aio"}):
        reply = subprocess.run([sys.executable, "-c", code, name], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert reply.returncode == 0, f"{name}: {reply.stderr[-2000:]}"
