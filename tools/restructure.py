"""Mechanical part of issue 13: one ``siguard`` import namespace and the runtime split into subpackages.

Usage (from the repository root; idempotent, so run it again after merging code written on the old layout)::

    python tools/restructure.py [--dry-run]

What it does, in order:

1. ``git mv`` the modules of ``MOVES``: errors to ``siguard/core``, the compile driver to ``siguard/pipeline.py``,
   and the runtime into subpackages: ``runtime/kernels`` (the engine interface and
   its interpretations), ``runtime/mpc`` (replicated sharing, PRG, transports), ``runtime/net`` (TLS links,
   party server, query client, configs, certificates, local process trios). Each subpackage gets an
   ``__init__.py``. Modules it does not list (new ones included) stay where they are.
2. Rewrite every Python file's imports to the namespace: ``compiler.x`` -> ``siguard.compiler.x``,
   ``runtime.rss`` -> ``siguard.runtime.mpc.rss`` and so on, as dotted names anywhere in code and strings
   (``import runtime.rss``, ``monkeypatch.setattr(runtime.rss.Client, ...)``, ``python -m privacy.experiments``,
   ``jinja2.PackageLoader("privacy", ...)``),
   and relative imports in moved files (or written for the old location) to the new location: relative
   within one package, absolute across packages.
3. Rewrite the same dotted names and the moved files' paths (``runtime/rss.py`` -> ``runtime/mpc/rss.py``)
   in Markdown, shell and CI files.
4. Regenerate ``[tool.setuptools]`` in pyproject.toml: ``package-dir`` maps each top-level folder under
   ``siguard.``, ``packages`` lists every package found on disk, package-data keys use the namespace.
5. Link each mapped folder into ``siguard/`` (``siguard/compiler -> ../compiler``, ...), so a checkout has the
   installed layout.
6. Sort the imports (``siguard`` is first-party) (``ruff check --select I --fix``).

It never touches ``.git``, ``build/``, virtualenvs, ``benchmarks/results`` or itself.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "siguard"
# top-level folders mapped to siguard.<folder> (siguard/ itself is the namespace package)
FOLDERS = ("compiler", "passes", "runtime", "privacy")
# old module (dotted, from the repository root) -> new module below the namespace; new names whose first part
# is not a folder of FOLDERS live in the siguard/ folder itself (siguard.core, siguard.pipeline)
MOVES = {
    "compiler.errors": "core.errors",
    "compiler.pipeline": "pipeline",
    "runtime.engine": "runtime.kernels.engine",
    "runtime.plain": "runtime.kernels.plain",
    "runtime.cost": "runtime.kernels.cost",
    "runtime.handlers": "runtime.kernels.handlers",
    "runtime.nonlinear": "runtime.kernels.nonlinear",
    "runtime.approx": "runtime.kernels.approx",
    "runtime.guard": "runtime.kernels.guard",
    "runtime.rss": "runtime.mpc.rss",
    "runtime.prg": "runtime.mpc.prg",
    "runtime.transport": "runtime.mpc.transport",
    "runtime.net": "runtime.net.tls",
    "runtime.netclient": "runtime.net.client",
    "runtime.server": "runtime.net.server",
    "runtime.config": "runtime.net.config",
    "runtime.certs": "runtime.net.certs",
    "runtime.processes": "runtime.net.processes",
    "runtime.inputs": "runtime.kernels.inputs",  # added by issue 16 on the old layout: an Engine-level clamp
}
# names that moved out of a module (namespaced old module -> {name: new module}); imports of them are split
SYMBOL_MOVES = {
    "siguard.runtime.mpc.rss": {
        "Client": "siguard.runtime.mpc.client",
        "run_threads": "siguard.runtime.mpc.inprocess",
        "PartyFailure": "siguard.runtime.mpc.inprocess",
        "SCHEDULERS": "siguard.runtime.mpc.inprocess",
    },
    "siguard.passes.approx": {
        "Calibrate": "siguard.passes.calibrate",
        "measure": "siguard.passes.search",
        "Candidate": "siguard.passes.candidates",
        "candidates_for": "siguard.passes.candidates",
        "guard_label": "siguard.passes.candidates",
        "parse_guard_label": "siguard.passes.candidates",
        "GUARD_KNOBS": "siguard.passes.candidates",
        "AccuracyBudget": "siguard.core.config",
        "parse_budget": "siguard.core.config",
        "parse_overrides": "siguard.core.config",
        "MODES": "siguard.core.config",
        "OBJECTIVES": "siguard.core.config",
    },
    "siguard.runtime.kernels.guard": {"GuardConfig": "siguard.core.config", "SCHEDULE_DEFAULTS": "siguard.core.config"},
    "siguard.runtime.net.certs": {"fingerprint_of_pem": "siguard.runtime.net.config"},
    "siguard.runtime.local": {
        "RunResult": "siguard.runtime.runs",
        "check_inputs": "siguard.runtime.runs",
        "op_breakdown": "siguard.runtime.stats",
        "format_breakdown": "siguard.runtime.stats",
    },
}
SUBPACKAGE_DOCS = {
    "core": "The bottom layer: the errors and configuration types that every other package may import.",
    "runtime.kernels": "The Engine interface, its cleartext and cost interpretations, and what is written once "
    "against it.\n\nNonlinear functions, their approximations, the guard, and the plan-op handlers.\n",
    "runtime.mpc": "Three-party replicated secret sharing: the secure engine, its randomness and the transports.",
    "runtime.net": "Parties on a network: mutual-TLS links, the party server and query client, configs, certificates.",
}
SKIP_DIRS = {".git", "build", "dist", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", "results"}
TEXT_SUFFIXES = {".md", ".sh", ".txt", ".toml", ".cfg", ".ini", ".j2", ".yml", ".yaml"}


def old_to_new(dotted: str) -> str | None:
    """The namespaced name of an old dotted module name (``runtime.rss`` -> ``siguard.runtime.mpc.rss``), or None."""
    parts = dotted.split(".")
    if parts[0] not in FOLDERS:
        return None
    for n in range(len(parts), 0, -1):
        moved = MOVES.get(".".join(parts[:n]))
        if moved:
            return ".".join([NAMESPACE, moved, *parts[n:]])
    return ".".join([NAMESPACE, *parts])


def new_to_old(dotted: str) -> str:
    """Inverse of :func:`old_to_new` for module names (``siguard.runtime.mpc.rss`` -> ``runtime.rss``)."""
    rest = dotted.removeprefix(NAMESPACE + ".")
    for old, new in MOVES.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def path_of(new: str) -> Path:
    """The file (without suffix) of a module named below the namespace (``runtime.mpc.rss``, ``core.errors``)."""
    parts = new.split(".")
    return ROOT.joinpath(*parts) if parts[0] in FOLDERS else ROOT.joinpath(NAMESPACE, *parts)


def module_exists(dotted: str) -> bool:
    """Whether a namespaced module (``siguard.runtime.mpc.rss``) or package exists on disk in this tree."""
    parts = dotted.split(".")
    if parts[0] != NAMESPACE:
        return False
    base = ROOT / parts[1] if len(parts) > 1 and parts[1] in FOLDERS else ROOT / NAMESPACE
    rest = parts[2:] if len(parts) > 1 and parts[1] in FOLDERS else parts[1:]
    path = base.joinpath(*rest) if rest else base
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() or path.is_dir()


def module_of(path: Path) -> str | None:
    """The namespaced module name of a file in the tree (None outside the mapped folders)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in FOLDERS:
        parts = [NAMESPACE, *parts]
    elif parts[0] != NAMESPACE:
        return None
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(path: Path) -> str | None:
    mod = module_of(path)
    if mod is None:
        return None
    return mod if path.name == "__init__.py" else mod.rpartition(".")[0]


# ---------------------------------------------------------------------------------------------------- moves


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def move_modules(dry: bool) -> list[str]:
    done = []
    for old, new in MOVES.items():
        src = ROOT.joinpath(*old.split(".")).with_suffix(".py")
        dst = path_of(new).with_suffix(".py")
        if not src.exists():
            continue
        if dst.exists():
            sys.exit(f"restructure: both {src.relative_to(ROOT)} and {dst.relative_to(ROOT)} exist; merge them by hand")
        done.append(f"{src.relative_to(ROOT)} -> {dst.relative_to(ROOT)}")
        if dry:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tracked = git("ls-files", "--error-unmatch", str(src)).returncode == 0
        if tracked:
            r = git("mv", str(src), str(dst))
            if r.returncode:
                sys.exit(f"restructure: git mv failed: {r.stderr.strip()}")
        else:
            src.rename(dst)
    for sub, doc in SUBPACKAGE_DOCS.items():
        pkg = path_of(sub)
        init = pkg / "__init__.py"
        if pkg.is_dir() and not init.exists() and not dry:
            init.write_text(f'"""{doc}"""\n')
            git("add", str(init))
    return done


# ---------------------------------------------------------------------------------------------------- imports

_DOTTED = re.compile(r"(?<![\w.])(?:" + "|".join(FOLDERS) + r")(?:\.\w+)+")
# a namespaced name of a module that has moved since (siguard.compiler.errors -> siguard.core.errors)
_STALE = re.compile(rf"(?<![\w.]){NAMESPACE}\.(?:" + "|".join(FOLDERS) + r")(?:\.\w+)+")
_FROM_REL = re.compile(r"^(\s*from\s+)(\.+)([\w.]*)(\s+import\s+)(.*)$")
_FROM_PKG = re.compile(r"^(\s*from\s+)(" + "|".join(FOLDERS) + r")(\s+import\s+)([\w, ]+)$")


def _known_old(dotted: str) -> str | None:
    """The longest prefix of an old dotted name that is a module of the old layout, or None."""
    parts = dotted.split(".")
    for n in range(len(parts), 1, -1):
        new = old_to_new(".".join(parts[:n]))
        if new and module_exists(new):
            return ".".join(parts[:n])
    return None


def _defines(module: str, name: str) -> bool:
    """Whether the (namespaced) module's file defines or imports ``name`` at the top level (a submodule counts)."""
    if module_exists(f"{module}.{name}"):
        return True
    path = path_of(module.removeprefix(NAMESPACE + ".")).with_suffix(".py")
    if not path.is_file():
        path = path.with_suffix("") / "__init__.py"
    if not path.is_file():
        return False
    pattern = rf"^(def|class|async def) {name}\b|^{name}\b\s*[:=]|^(from|import) .*\b{name}\b"
    return re.search(pattern, path.read_text(), flags=re.M) is not None


def rewrite_dotted(text: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(0)
        prefix = _known_old(name)
        if prefix is None:
            return name
        rest = name[len(prefix):]
        if rest and not _defines(old_to_new(prefix), rest.split(".")[1]):
            return name  # not an attribute of that module: a path in a document ("passes.bounds.changes")
        return old_to_new(prefix) + rest

    def sub_stale(m: re.Match) -> str:
        name = m.group(0)
        old = name[len(NAMESPACE) + 1:].split(".")
        for n in range(len(old), 1, -1):
            prefix = ".".join(old[:n])
            if prefix in MOVES:
                if module_exists(f"{NAMESPACE}.{prefix}"):
                    return name
                return ".".join([NAMESPACE, MOVES[prefix], *old[n:]])
        return name

    return _STALE.sub(sub_stale, _DOTTED.sub(sub, text))


def _resolve_relative(pkg: str, dots: str, rest: str) -> str:
    base = pkg.split(".")
    if len(dots) > 1:
        base = base[: len(base) - (len(dots) - 1)]
    return ".".join(base + ([rest] if rest else []))


def _map_lines(text: str, pattern: re.Pattern, fn) -> str:
    """Each line that ``pattern`` matches (without its newline) replaced by ``fn(match)`` (None: kept)."""
    out = []
    for line in text.splitlines(keepends=True):
        m = pattern.match(line.rstrip("\n"))
        new = fn(m) if m else None
        out.append(line if new is None else new + line[len(line.rstrip("\n")):])
    return "".join(out)


def rewrite_relative(path: Path, text: str) -> str:
    """Relative imports that do not resolve from the file's place: resolve them from its old place and rewrite."""
    pkg = package_of(path)
    if pkg is None:
        return text
    # the package the file had in the old layout (``runtime`` for runtime/mpc/rss.py), without the namespace
    old_pkg = new_to_old(module_of(path)).rpartition(".")[0] if path.name != "__init__.py" else new_to_old(pkg)

    def rewrite(m: re.Match) -> str | None:
        head, dots, rest, imp, names = m.groups()
        target = _resolve_relative(pkg, dots, rest)
        if rest and module_exists(target):
            return None
        if not rest:  # from . import name: fine if every name is a module or the package's own attribute
            single = names.split(" as ")[0].strip().strip("(")
            if module_exists(f"{target}.{single}") or "," in names or "(" in names:
                return None
        old_base = _resolve_relative(old_pkg, dots, rest) if old_pkg else None
        new = old_to_new(old_base) if old_base else None
        if new is None and old_pkg and not rest:
            single = names.split(" as ")[0].strip()
            full = old_to_new(f"{_resolve_relative(old_pkg, dots, '')}.{single}")
            if full and module_exists(full):
                parent, _, leaf = full.rpartition(".")
                alias = f" as {single}" if leaf != single and " as " not in names else ""
                return f"{head}{_relativise(pkg, parent)}{imp}{leaf}{alias}{names[len(single):]}"
        if new is None or not module_exists(new):
            print(f"restructure: warning: cannot resolve {m.group(0).strip()!r} in {path.relative_to(ROOT)}")
            return None
        return f"{head}{_relativise(pkg, new)}{imp}{names}"

    return _map_lines(text, _FROM_REL, rewrite)


def _relativise(pkg: str, target: str) -> str:
    """``.name`` when ``target`` is a module of ``pkg`` itself, else the absolute name."""
    parent, _, leaf = target.rpartition(".")
    return f".{leaf}" if parent == pkg else target


def rewrite_from_package(text: str) -> str:
    """``from runtime import rss`` -> ``from siguard.runtime.mpc import rss`` (one line per new package)."""

    def rewrite(m: re.Match) -> str | None:
        head, pkg, imp, names = m.groups()
        by_parent: dict[str, list[str]] = {}
        for name in (n.strip() for n in names.split(",") if n.strip()):
            parent = old_to_new(f"{pkg}.{name.split(' as ')[0].strip()}").rpartition(".")[0]
            by_parent.setdefault(parent, []).append(name)
        indent = head[: len(head) - len(head.lstrip())]
        return "\n".join(f"{indent}from {parent}{imp}{', '.join(items)}" for parent, items in by_parent.items())

    return _map_lines(text, _FROM_PKG, rewrite)


_FROM_ABS = re.compile(r"^([ \t]*)from[ \t]+([\w.]+)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)", re.M)


def rewrite_moved_symbols(text: str) -> str:
    """``from siguard.runtime.mpc.rss import RSSEngine, run_threads`` -> one import per module the names live in."""

    def sub(m: re.Match) -> str:
        indent, module, names = m.group(1), m.group(2), m.group(3)
        moved = {k: v for k, v in SYMBOL_MOVES.get(module, {}).items() if module_exists(v)}
        if not moved:
            return m.group(0)
        comment = ""
        if "#" in names and not names.startswith("("):
            names, comment = names.split("#", 1)
            comment = "  #" + comment
        items = [n.strip() for n in names.strip("()").replace("\n", " ").split(",") if n.strip()]
        if not any(i.split(" as ")[0].strip() in moved for i in items):
            return m.group(0)
        by_module: dict[str, list[str]] = {}
        for item in items:
            by_module.setdefault(moved.get(item.split(" as ")[0].strip(), module), []).append(item)
        return "\n".join(f"{indent}from {mod} import {', '.join(its)}{comment}" for mod, its in by_module.items())

    text = _FROM_ABS.sub(sub, text)
    for module, names in SYMBOL_MOVES.items():  # dotted uses: siguard.runtime.mpc.rss.Client
        for name, new in names.items():
            if not module_exists(new):
                continue
            text = re.sub(rf"(?<![\w.]){re.escape(module)}([.:]){name}\b", rf"{new}\g<1>{name}", text)
    return text


_PACKAGE_STRING = re.compile(r"""(PackageLoader\(|files\(|import_module\()(["'])(""" + "|".join(FOLDERS) + r")(\2|\.)")


def rewrite_package_strings(text: str) -> str:
    """Package names in strings that load resources or modules: ``PackageLoader("privacy", ...)``."""
    return _PACKAGE_STRING.sub(lambda m: f"{m.group(1)}{m.group(2)}{NAMESPACE}.{m.group(3)}{m.group(4)}", text)


def rewrite_paths(text: str) -> str:
    """Paths of moved files: ``runtime/rss.py`` -> ``runtime/mpc/rss.py`` (not ``tests/runtime/rss.py``)."""
    for old, new in MOVES.items():
        src = old.replace(".", "/") + ".py"
        dst = path_of(new).with_suffix(".py").relative_to(ROOT).as_posix()
        text = re.sub(rf"(?<![\w/.]){re.escape(src)}\b", dst, text)
    return text


def files(suffixes: set[str]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            p = Path(dirpath) / name
            if p.suffix in suffixes or (p.parent.name == ".ci" and p.suffix == ""):
                found.append(p)
    this = Path(__file__).resolve()
    return sorted(p for p in found if p.resolve() != this and p.name != "pyproject.toml")


LINE_LENGTH = 120


def wrap_docstrings(text: str) -> str:
    """Break lines inside triple-quoted strings that the longer names pushed past the line length."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return text
    inside = set()
    for tok in tokens:
        if tok.type == tokenize.STRING and tok.string.endswith(('"""', "'''")):
            inside.update(range(tok.start[0], tok.end[0] + 1))
    lines = text.splitlines(keepends=True)
    out = []
    for no, line in enumerate(lines, 1):
        body = line.rstrip("\n")
        while no in inside and len(body) > LINE_LENGTH and " " in body.strip():
            indent = body[: len(body) - len(body.lstrip())]
            cut = body.rfind(" ", len(indent) + 1, LINE_LENGTH + 1)
            if cut <= len(indent):
                break
            out.append(body[:cut] + "\n")
            body = indent + body[cut + 1:]
        out.append(body + line[len(line.rstrip("\n")):])
    return "".join(out)


def rewrite_tree(dry: bool) -> list[Path]:
    changed = []
    for path in files({".py"} | TEXT_SUFFIXES):
        text = path.read_text()
        new = text
        if path.suffix == ".py":
            new = rewrite_relative(path, new)
            new = rewrite_from_package(new)
        new = rewrite_dotted(new)
        new = rewrite_moved_symbols(new)
        new = rewrite_package_strings(new)
        new = rewrite_paths(new)
        if path.suffix == ".py" and new != text:
            new = wrap_docstrings(new)
        if new != text:
            changed.append(path)
            if not dry:
                path.write_text(new)
    return changed


# ---------------------------------------------------------------------------------------------------- pyproject


def packages() -> list[str]:
    found = [NAMESPACE]
    for dirpath, dirnames, filenames in os.walk(ROOT / NAMESPACE):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        if "__init__.py" in filenames and Path(dirpath) != ROOT / NAMESPACE:
            found.append(".".join(Path(dirpath).relative_to(ROOT).parts))
    for folder in FOLDERS:
        for dirpath, dirnames, filenames in os.walk(ROOT / folder):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            if "__init__.py" in filenames:
                rel = Path(dirpath).relative_to(ROOT).parts
                found.append(".".join([NAMESPACE, *rel]))
    return found


def rewrite_pyproject(dry: bool) -> bool:
    path = ROOT / "pyproject.toml"
    text = path.read_text()
    dirs = "".join(f'"{NAMESPACE}.{f}" = "{f}"\n' for f in FOLDERS)
    pkgs = "".join(f'    "{p}",\n' for p in packages())
    section = (
        "[tool.setuptools]\n"
        "# One import package: the top-level folders are siguard's subpackages (siguard/__init__.py explains how a\n"
        "# checkout finds them). tools/restructure.py regenerates this list.\n"
        f"packages = [\n{pkgs}]\n\n"
        "[tool.setuptools.package-dir]\n"
        f'"{NAMESPACE}" = "{NAMESPACE}"\n{dirs}\n'
    )
    new = re.sub(r"\[tool\.setuptools\.package-dir\]\n.*?\n(?=\[)", "", text, count=1, flags=re.S)
    new = re.sub(r"\[tool\.setuptools\]\n.*?\n(?=\[)", section, new, count=1, flags=re.S)
    new = re.sub(rf"^({'|'.join(FOLDERS)}) = \[", rf'"{NAMESPACE}.\1" = [', new, flags=re.M)
    if "known-first-party" not in new:  # siguard.compiler has no siguard/compiler folder for ruff to find
        new = new.replace("[tool.ruff.lint]\n", "[tool.ruff.lint.isort]\nknown-first-party = [\"siguard\"]\n\n"
                          "[tool.ruff.lint]\n", 1)
    if new != text and not dry:
        path.write_text(new)
    return new != text


def checkout_links(dry: bool) -> list[str]:
    """Relative symlinks siguard/<folder> -> ../<folder> for the mapped top-level folders, so that a checkout
    has the installed layout (imports from the root, import-linter's walk of the package)."""
    made = []
    for folder in FOLDERS:
        link = ROOT / NAMESPACE / folder
        if (ROOT / folder).is_dir() and not link.exists() and not link.is_symlink():
            if not dry:
                link.symlink_to(Path("..") / folder, target_is_directory=True)
            made.append(f"{NAMESPACE}/{folder} -> ../{folder}")
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    args = ap.parse_args()
    for line in move_modules(args.dry_run):
        print("moved", line)
    changed = rewrite_tree(args.dry_run)
    for p in changed:
        print("rewrote", p.relative_to(ROOT))
    if rewrite_pyproject(args.dry_run):
        print("rewrote pyproject.toml")
    for line in checkout_links(args.dry_run):
        print("linked", line)
    if not args.dry_run:  # imports sorted for the namespace (a tree that was clean before has nothing else to sort)
        subprocess.run([sys.executable, "-m", "ruff", "check", "-q", "--select", "I", "--fix", "."], cwd=ROOT)


if __name__ == "__main__":
    main()
