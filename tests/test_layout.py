"""The package layout holds: dependencies point one way (no import cycle, type-only ones included), no module
imports another's private name, layers only point down (the Ray layer and the reports import no recipe), jobs never
patch sys.path, the core imports no Ray, and the public surface of `puma_ray` resolves without importing torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import puma_ray

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "puma_ray"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, at any depth (lazy ones too)."""
    tree, here = ast.parse(path.read_text()), _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.append((base, [alias.name for alias in node.names]))
    return out


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for module, names in _imports(path):
            for candidate in [module, *(f"{module}.{n}" for n in names)]:
                if candidate in MODULES and candidate != name and candidate != "puma_ray":
                    deps.add(candidate)
        graph[name] = deps
    return graph


def test_no_import_cycle():
    graph, state, stack, cycles = _graph(), {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the walk really saw the package
    assert not cycles, cycles


def test_no_private_names_across_modules():
    crossings = []
    for name, path in MODULES.items():
        for module, names in _imports(path):
            if module.startswith("puma_ray") and module != name:
                crossings += [f"{name} imports {module}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not crossings, crossings


def test_layers_only_point_down():
    """ray_layer/ offers Ray utilities and reports/ renders results: neither imports a recipe, lazily or not (the
    recipes sit on top of both). Every import at any depth, as `git grep "from puma_ray.recipes"` would show."""
    upward = [f"{name} imports {module}" for name, path in MODULES.items()
              if name.startswith(("puma_ray.ray_layer", "puma_ray.reports"))
              for module, names in _imports(path)
              if any(m == "puma_ray.recipes" or m.startswith("puma_ray.recipes.")
                     for m in [module, *(f"{module}.{n}" for n in names)])]
    assert not upward, upward
    grep = subprocess.run(["git", "grep", "-n", "-e", "from puma_ray.recipes", "-e", "import puma_ray.recipes", "--",
                           "puma_ray/ray_layer", "puma_ray/reports"], cwd=REPO, capture_output=True, text=True)
    assert grep.returncode == 1 and not grep.stdout, grep.stdout


def test_core_imports_no_ray():
    """Only ray_layer/ imports Ray (recipes/engine.py reaches it through ray_layer, lazily)."""
    offenders = [name for name, path in MODULES.items() if not name.startswith("puma_ray.ray_layer")
                 and any(m == "ray" or m.startswith("ray.") for m, _ in _imports(path))]
    assert not offenders, offenders


def test_jobs_and_package_never_patch_sys_path():
    """Jobs import the installed package; none reaches into another script's folder (what `git grep sys.path`
    over jobs/ and puma_ray/ would show)."""
    files = [*(REPO / "jobs").glob("*.py"), *PACKAGE.rglob("*.py")]
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if "sys.path" in line]
    assert len(files) > 50 and not hits, hits


def test_public_surface_resolves_without_torch():
    code = ("import sys, puma_ray; assert 'torch' not in sys.modules, 'import puma_ray loaded torch'; "
            "[getattr(puma_ray, n) for n in puma_ray.__all__]; print(len(puma_ray.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) == len(puma_ray.__all__) > 30


def test_console_scripts_resolve_to_the_jobs_mains():
    """pyproject.toml installs puma-migrate/-convert/-import/-export/-repair; each names an importable function, and
    jobs/<name>.py (kept for `ray job submit`) runs the same main."""
    import importlib
    import importlib.util
    import re
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, re.M))  # (tomllib: Python 3.11+ only)
    assert set(scripts) == {"puma-migrate", "puma-convert", "puma-import", "puma-export", "puma-repair"}
    for command, target in scripts.items():
        module_name, function = target.split(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, function)), command
        job = REPO / "jobs" / f"{module_name.rsplit('.', 1)[1]}.py"
        spec = importlib.util.spec_from_file_location(f"job_{job.stem}", job)
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        assert script.main is module.main, command
    proc = subprocess.run([sys.executable, "-m", "puma_ray.cli.export_system", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--format" in proc.stdout, proc.stderr[-2000:]
