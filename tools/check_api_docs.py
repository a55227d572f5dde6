"""Fail when a public name of sharpness is missing from the built API reference.

    mkdocs build --strict --site-dir SITE && python tools/check_api_docs.py SITE

The public names: ``sharpness.__all__`` and the submodules ``import sharpness`` exposes lazily
(``sharpness.measure``), ``sharpness.numpy.__all__``, and the names of the public modules in
:data:`PUBLIC_MODULES` (their ``__all__``, or their top-level functions and classes where they have
none). A name is documented when the site's inventory (``objects.inv``, written by mkdocstrings)
lists it and the page it points to has its anchor. Needs numpy only (``import sharpness`` loads no
torch; the modules of the torch front are read as source).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import sys
import zlib
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "python" / "sharpness"

#: The public modules whose own names must be documented too (the torch front's modules, read as
#: source so that the check needs no torch).
PUBLIC_MODULES = (
    "batchnorm",
    "groups",
    "mup2",
    "regularizers",
    "measure",
    "rho_finder",
    "distributed",
    "integrations.lightning",
    "integrations.hf",
)


def module_names(path: Path) -> list[str]:
    """A module's public names, from its source: its ``__all__`` when it is a literal list, else
    the functions and classes it defines whose names do not start with ``_``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(target, ast.Name) and target.id == "__all__" for target in targets) and node.value is not None:
            return list(ast.literal_eval(node.value))
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return [node.name for node in tree.body if isinstance(node, definitions) and not node.name.startswith("_")]


def public_names(source: Path = SOURCE) -> list[str]:
    """Every name the reference must document, as a dotted path (``sharpness.LookSAM``)."""
    sharpness = importlib.import_module("sharpness")
    numpy_front = importlib.import_module("sharpness.numpy")
    names = [f"sharpness.{name}" for name in [*sharpness.__all__, *sharpness._TORCH_MODULES]]
    names += [f"sharpness.numpy.{name}" for name in numpy_front.__all__]
    for module in PUBLIC_MODULES:
        path = source.joinpath(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        names += [f"sharpness.{module}.{name}" for name in module_names(path)]
    return list(dict.fromkeys(names))


def read_inventory(site: Path) -> dict[str, str]:
    """``objects.inv`` (Sphinx's inventory, version 2): documented name -> its URL in the site."""
    data = (site / "objects.inv").read_bytes()
    header_lines = 4
    lines = data.split(b"\n", header_lines)
    if not lines[0].startswith(b"# Sphinx inventory version 2"):
        raise ValueError(f"{site / 'objects.inv'} is not a Sphinx inventory of version 2")
    inventory = {}
    for line in zlib.decompress(lines[header_lines]).decode("utf-8").splitlines():
        match = re.match(r"(?P<name>\S+)\s+\S+:\S+\s+-?\d+\s+(?P<uri>\S*)", line)
        if match:
            name = match["name"]
            inventory[name] = match["uri"].replace("$", name) if match["uri"].endswith("$") else match["uri"]
    return inventory


def has_anchor(site: Path, uri: str) -> bool:
    """Whether the page ``uri`` points to exists in the site and has the anchor it names."""
    page, _, anchor = uri.partition("#")
    path = site / page
    if page == "" or page.endswith("/"):
        path = path / "index.html"
    if not path.is_file():
        return False
    return not anchor or f'id="{anchor}"' in path.read_text(encoding="utf-8")


def undocumented(site: Path, names: list[str]) -> list[str]:
    """The names that the site does not document (not in its inventory, or without their anchor)."""
    inventory = read_inventory(site)
    return [name for name in names if name not in inventory or not has_anchor(site, inventory[name])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the directory mkdocs built the site into")
    site = parser.parse_args(argv).site
    names = public_names()
    missing = undocumented(site, names)
    if missing:
        print(f"{len(missing)} public name(s) missing from the API reference in {site}:", *missing, sep="\n  ")
        return 1
    print(f"API reference: all {len(names)} public names documented")
    return 0


if __name__ == "__main__":
    sys.exit(main())
