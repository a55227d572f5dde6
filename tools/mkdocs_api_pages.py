"""MkDocs hook (mkdocs.yml, ``hooks:``): the API reference's pages, generated at build time.

The pages are written from :data:`MODULES` (one page per public module) and from
``sharpness.methods.every_method()`` (one page per method module: ``methods/looksam.md`` documents
``sharpness.LookSAM`` and ``sharpness.EveryKSAM``), so a new method gets its page without an edit
here. The nav entry ``API reference: api/index.md`` of mkdocs.yml is expanded into the generated
pages. Nothing here imports torch: the docs build without it.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

import griffe
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

#: The package's source (mkdocs.yml's ``paths``), and the class whose members every method shares.
SOURCE = Path(__file__).resolve().parent.parent / "python"
METHOD = "sharpness.methods.base.Method"

#: Where the API reference sits in the nav, and its hand-written overview page.
NAV_TITLE = "API reference"
OVERVIEW_PAGE = "api/index.md"

#: The public modules documented with their members (those of ``__all__`` where the module has
#: one), one page each: (module under ``sharpness.``, nav title, subject).
MODULES = [
    ("numpy", "numpy front", "the numpy front"),
    ("batchnorm", "BatchNorm", "BatchNorm's running statistics"),
    ("groups", "Parameter groups", "parameter groups"),
    ("mup2", "μP²", "layerwise radii under μP"),
    ("regularizers", "SAF, MESA", "SAF and MESA"),
    ("measure", "Measuring sharpness", "sharpness of a trained model"),
    ("rho_finder", "Finding ρ", "a radius range test"),
    ("distributed", "Distributed", "DDP and FSDP2"),
]


def object_block(identifier: str, **options: Any) -> str:
    """A mkdocstrings ``:::`` block for ``identifier`` (a heading of level 2 unless told)."""
    options = {"heading_level": 2, **options}
    lines = [f"::: {identifier}", "    options:"]
    lines += [f"      {key}: {str(value).lower() if isinstance(value, bool) else value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


@functools.cache
def _package() -> griffe.Module:
    return griffe.load("sharpness", search_paths=[str(SOURCE)], resolve_aliases=False)


def beyond_method(class_path: str) -> list[str]:
    """The public members a class has beyond those every method has (:data:`METHOD`'s, on their
    own page): for a rule, what it adds (``LETS.update_rho``, ``SSAMF.update_mask`` ...), its bases'
    included; for a front, what its mixins add (``SAM.memory_bytes`` ...)."""
    cls = _package()[class_path.removeprefix("sharpness.")]
    found = []
    for name, member in cls.all_members.items():
        defined_in = member.target.parent.path if member.is_alias else class_path
        if not name.startswith("_") and defined_in != METHOD:
            found.append(name)
    return sorted(found)


@functools.cache
def rules() -> dict[str, type]:
    """Every method's rule, by name (``sharpness.methods.every_method()``; torch-free)."""
    return importlib.import_module("sharpness.methods").every_method()


def method_modules() -> dict[str, list[str]]:
    """The method modules (``looksam``) and the classes each defines."""
    modules: dict[str, list[str]] = {}
    for name, rule in rules().items():
        modules.setdefault(rule.__module__.rsplit(".", 1)[-1], []).append(name)
    return modules


def page(title: str, blocks: list[str]) -> str:
    return f"# {title}\n\n" + "\n".join(blocks)


def method_page(module: str, names: list[str]) -> str:
    """The torch classes of one method module, after the module's own docstring (the method's
    background); each class's numpy twin is on the numpy page."""
    numpy_links = ", ".join(f"[`sharpness.numpy.{name}`][sharpness.numpy.{name}]" for name in names)
    note = (
        f"The torch classes below take every argument of [`sharpness.SAM`][sharpness.SAM] and have its methods "
        f"(`step`, `first_step`, `second_step`, `state_dict` ...); the numpy front has the same rules: {numpy_links}.\n"
    )
    background = object_block(f"sharpness.methods.{module}", members=False, show_root_heading=False)
    classes = [object_block(f"sharpness.{name}", inherited_members=beyond_method(f"{rules()[name].__module__}.{name}"))
               for name in names]
    return page(", ".join(names), [background, note, *classes])


def pages() -> dict[str, tuple[str, str]]:
    """Every generated page, in nav order: path -> (nav title, Markdown)."""
    torch_front = [
        object_block("sharpness.optim", members=False),
        object_block("sharpness.SAM", inherited_members=beyond_method("sharpness.optim.sam.SAM")),
    ]
    generated = {"api/sam.md": ("SAM (torch front)", page("sharpness.SAM: the torch front", torch_front))}
    for module, names in sorted(method_modules().items()):
        generated[f"api/methods/{module}.md"] = (", ".join(names), method_page(module, names))
    for module, nav_title, subject in MODULES:
        generated[f"api/{module}.md"] = (nav_title, page(f"sharpness.{module}: {subject}", [object_block(f"sharpness.{module}")]))
    integrations = [object_block(f"sharpness.integrations{name}") for name in ["", ".lightning", ".hf"]]
    title = "sharpness.integrations: Lightning and HuggingFace"
    generated["api/integrations.md"] = ("Lightning, HF Trainer", page(title, integrations))
    intro = "How the pieces below fit together, and what a new method touches: [Architecture](../architecture.md).\n"
    method_api = [intro, *(object_block(f"sharpness.methods{name}") for name in ["", ".base", ".contract"])]
    title = "sharpness.methods: the rules, for a new method"
    generated["api/writing_a_method.md"] = ("Writing a method", page(title, method_api))
    return generated


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Expand the nav's ``API reference: api/index.md`` into the overview and the generated pages."""
    section: list[Any] = [{"Overview": OVERVIEW_PAGE}]
    methods: list[dict[str, str]] = []
    for path, (title, _) in pages().items():
        if path.startswith("api/methods/"):
            if not methods:
                section.append({"Methods": methods})
            methods.append({title: path})
        else:
            section.append({title: path})
    for index, entry in enumerate(config.nav or []):
        if isinstance(entry, dict) and entry.get(NAV_TITLE) == OVERVIEW_PAGE:
            config.nav[index] = {NAV_TITLE: section}  # type: ignore[index]
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for path, (_, markdown) in pages().items():
        files.append(File.generated(config, path, content=markdown))
    return files
