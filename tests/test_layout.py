"""The repository's layout rules, read from the source: who may import whom, no import circle,
and a config that loads without the training stack."""

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("lion_optax", "models", "train", "configs")


def _module_name(path: str) -> str:
    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _imports() -> dict[str, set[str]]:
    """module -> every module it imports (at top level or inside a function)."""
    graph = {}
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(root, f)
                name, found = _module_name(path), set()
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    if isinstance(node, ast.Import):
                        found |= {a.name for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                        found.add(node.module)
                        found |= {f"{node.module}.{a.name}" for a in node.names}
                graph[name] = found
    return graph


def test_packages_import_only_what_the_layout_allows():
    allowed_third_party = {"lion_optax": {"jax", "optax", "numpy"}}
    forbidden = {"lion_optax": {"flax", "models", "train", "configs"},
                 "models": {"train", "configs"}, "configs": {"jax", "flax", "grain", "tensorflow_datasets"}}
    for module, imported in _imports().items():
        package = module.split(".")[0]
        tops = {i.split(".")[0] for i in imported}
        assert not tops & {"torch", "transformers"}, module  # test references only
        assert not tops & forbidden.get(package, set()), (module, tops & forbidden[package])
        if package in allowed_third_party:
            others = tops - allowed_third_party[package] - {package, "__future__"}
            assert all(t in sys.stdlib_module_names for t in others), (module, others)


def test_no_import_circle():
    graph = _imports()
    # A module's own packages are initialised before it in any case: not an edge.
    edges = {m: {i for i in imported if i in graph and i != m and not m.startswith(i + ".")}
             for m, imported in graph.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m, path):
        state[m] = 1
        for n in sorted(edges[m]):
            assert state.get(n) != 1, " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])


def test_loading_a_config_needs_no_jax():
    code = ("import sys, configs.lm, configs.vit; "
            "c = configs.lm.get_config('8b'); v = configs.vit.get_config('B/16'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'jax', 'flax', 'grain', 'tensorflow_datasets', 'orbax'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
