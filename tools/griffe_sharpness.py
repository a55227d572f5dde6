"""A Griffe extension for the API reference (mkdocs.yml loads it): what static analysis of
``python/sharpness`` cannot see, made visible to mkdocstrings.

- The method classes of both fronts (``sharpness.LookSAM``, ``sharpness.numpy.LookSAM`` ...) are
  built at import time from ``sharpness.methods.every_method()`` (``type(name, (rule, front), ...)``),
  which Griffe's static analysis does not run. This extension asks the same function (torch-free)
  and adds each class to the tree as the subclass it is at run time: bases ``(rule, front SAM)``,
  the rule's docstring, the rule's ``__init__`` (by inheritance, so its keyword arguments show in
  the signature). The names ``import sharpness`` loads lazily become aliases there, and the
  fronts' ``__all__`` take their run-time value. A class that a module builds inside a function
  (``sharpness.integrations.hf.SAMTrainer``) is read from its source.
- The docstrings use Sphinx's conventions, which Markdown would print as they are. A role
  (``:class:`SAM```, ``:func:`~sharpness.measure.m_sharpness```) becomes a cross-reference to the
  name resolved in the docstring's scope, or plain code where the reference has no entry for it
  (private, undocumented, another package's); a name that does not resolve at all stays a link and
  fails ``mkdocs build --strict``. A ``#:`` comment above an attribute becomes its docstring, a
  line-final ``::`` a ``:``, an ``Example:`` heading Google style's ``Examples:``.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import griffe

#: ``:role:`target``` and ``:role:`~a.b.target``` (shown as ``target``), Sphinx's Python roles.
SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const):`(~?)([^`<>]+?)`")
#: A line ending with reST's literal-block marker ``::``.
LITERAL_BLOCK_MARKER = re.compile(r"(?<=\S)::$", re.MULTILINE)
#: Google style's section is "Examples:"; the docstrings' "Example:" would be an admonition whose
#: doctest lines Markdown would set as prose.
EXAMPLE_HEADING = re.compile(r"^(\s*)Example:$", re.MULTILINE)
#: Packages whose objects the reference does not document: a role naming one is set as code.
EXTERNAL_PACKAGES = ("torch", "numpy", "np", "transformers", "lightning", "accelerate", "triton", "math", "collections", "typing")
#: What Griffe's inspection of the native module finds as a constant's docstring: its type's.
BUILTIN_DOCSTRINGS = {inspect.cleandoc(kind.__doc__ or "") for kind in (str, int, float, bool, tuple, list, dict)}

# The fronts whose classes are built from the rules: module -> its front class (canonical path).
FRONTS = {"optim": "sharpness.optim.sam.SAM", "numpy": "sharpness.numpy.front.SAM"}

Resolver = Callable[[str], "str | None"]
Subclasses = dict[str, list[griffe.Class]]


def sphinx_roles_to_crossrefs(text: str, resolve: Resolver = lambda target: target) -> str:
    """Rewrite Sphinx roles as mkdocstrings cross-references, a line-final ``::`` as ``:`` and an
    ``Example:`` heading as ``Examples:``.

    ``resolve`` gives the path to link to, or ``None`` for a name the reference does not document
    (a private or undocumented object, another package's): that name is set as code, unlinked.

    >>> sphinx_roles_to_crossrefs("see :class:`~sharpness.optim.SAM` and :meth:`first_step`::")
    'see [`SAM`][sharpness.optim.SAM] and [`first_step`][first_step]:'
    >>> sphinx_roles_to_crossrefs(":class:`torch.optim.SGD`", lambda target: None)
    '`torch.optim.SGD`'
    """

    def crossref(match: re.Match[str]) -> str:
        short, target = match.group(1), match.group(2).strip().removesuffix("()")
        title = target.rsplit(".", 1)[-1] if short else target
        path = resolve(target)
        return f"[`{title}`][{path}]" if path is not None else f"`{title}`"

    text = EXAMPLE_HEADING.sub(r"\1Examples:", text)
    return LITERAL_BLOCK_MARKER.sub(":", SPHINX_ROLE.sub(crossref, text))


def resolver(obj: griffe.Object, subclasses: Subclasses) -> Resolver:
    """Resolve a role's target as Python would from ``obj``'s docstring: an absolute path, or a name
    in the scope, where a class's members include the inherited ones (static scoping leaves them
    out) and, failing those, its subclasses' (``subclasses``: class path -> subclasses): a rule's
    or a mixin's docstring names what ``self`` has at run time, the front's ``first_step``.

    A target that does not resolve is returned as it is: its link then fails the strict build."""

    def resolve(target: str) -> str | None:
        if target.split(".", 1)[0] in EXTERNAL_PACKAGES:
            return None
        found = _lookup(obj, target, subclasses)
        if found is None:
            return target  # a broken reference: mkdocs build --strict reports it
        try:
            final = found.final_target if found.is_alias else found
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None  # an object of another package
        # Private: as written, or by its own name (a public member of a private base class is
        # public); undocumented: an attribute or function without a docstring has no entry.
        private = any(part.startswith("_") and not part.startswith("__") for part in [*target.split("."), final.name])
        undocumented = final.docstring is None and not (final.is_module or final.is_class)
        return None if private or undocumented else final.path

    return resolve


def _member(obj: griffe.Object | griffe.Alias, name: str, subclasses: Subclasses) -> griffe.Object | griffe.Alias | None:
    try:
        if not obj.is_class:
            return obj.members.get(name)
        candidates = (cls.all_members.get(name) for cls in [obj, *subclasses.get(obj.path, [])])
        return next((member for member in candidates if member is not None), None)
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def subclasses_in(pkg: griffe.Module) -> Subclasses:
    """Each class of the package -> the package's classes derived from it (directly), those of
    the torch front first (a rule's docstring speaks of its torch class)."""
    found: Subclasses = {}
    classes = [obj for obj in _objects(pkg) if isinstance(obj, griffe.Class)]
    for cls in sorted(classes, key=lambda cls: not cls.path.startswith("sharpness.optim.")):
        for base in cls.resolved_bases:
            found.setdefault(base.path, []).append(cls)
    return found


def _lookup(obj: griffe.Object, target: str, subclasses: Subclasses) -> griffe.Object | griffe.Alias | None:
    first, *rest = target.split(".")
    found: griffe.Object | griffe.Alias | None = None
    if first == "sharpness":
        found = obj.modules_collection.get_member("sharpness")
    else:
        scope: griffe.Object | None = obj
        while scope is not None and found is None:
            found = _member(scope, first, subclasses)
            scope = scope.parent
    for name in rest:
        if found is None:
            break
        found = _member(found, name, subclasses)
    return found


def numpy_docstring(name: str, rule_docstring: str) -> str:
    """The numpy class's page text: the rule's summary and where its arguments are described.

    The rule's full docstring (its torch example included) is on the torch class's page; repeating
    it for each front would double the reference."""
    summary = rule_docstring.strip().split("\n\n", 1)[0]
    return (
        f"{summary}\n\nThe numpy front of :class:`sharpness.{name}`: the same rule and the same arguments, with "
        f"``params`` a list of numpy arrays and the gradients passed to the steps (see :class:`sharpness.numpy.SAM`)."
    )


#: What the package builds at import (torch-free), asked in a fresh interpreter: Griffe's own
#: inspection of the native module imports ``sharpness`` and then removes part of it from
#: ``sys.modules``, after which an import here would see half-initialised modules.
RUNTIME_QUERY = """
import json, sharpness
from sharpness.methods import every_method
print(json.dumps({"all": list(sharpness.__all__), "lazy": dict(sharpness._TORCH_FRONT),
                  "rules": {name: rule.__module__ for name, rule in every_method().items()}}))
"""


@functools.cache
def runtime_view() -> dict[str, Any]:
    """``sharpness.__all__``, the lazily loaded names (name -> module) and the rules (name -> module)."""
    done = subprocess.run([sys.executable, "-c", RUNTIME_QUERY], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


class DynamicMethodClasses(griffe.Extension):
    """Adds what is built at run time, and rewrites the Sphinx roles (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "sharpness":
            return
        runtime = runtime_view()
        rules: dict[str, str] = runtime["rules"]
        for front_module, front_class in FRONTS.items():
            module = pkg.get_member(front_module)
            for name, rule in rules.items():
                built = _front_class(pkg, loader, name, f"{rule}.{name}", front_class, numpy=front_module == "numpy")
                module.set_member(name, built)
            module.exports = ["SAM", *sorted(rules)]
        # `import sharpness` exposes the torch front lazily (PEP 562): every name of its run-time
        # __all__ that static analysis did not find becomes an alias of the module that defines it.
        pkg.exports = runtime["all"]
        for name in runtime["all"]:
            if name not in pkg.members and name in runtime["lazy"]:
                pkg.set_member(name, griffe.Alias(name, f"{runtime['lazy'][name]}.{name}", parent=pkg))
        for module in _modules(pkg):
            _add_classes_built_in_functions(module, loader)
        for obj in _objects(pkg):  # every docstring first: the roles below link only to documented objects
            if obj.is_attribute and obj.docstring is not None and obj.docstring.value.strip() in BUILTIN_DOCSTRINGS:
                obj.docstring = None  # inspected in the native module: str's docstring, not the constant's
            if obj.is_attribute and obj.docstring is None:
                _docstring_from_comment(obj, loader)
        subclasses = subclasses_in(pkg)
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = sphinx_roles_to_crossrefs(obj.docstring.value, resolver(obj, subclasses))


def _docstring_from_comment(attribute: griffe.Object, loader: griffe.GriffeLoader) -> None:
    """Give an attribute the ``#:`` comment above it as its docstring (Sphinx's convention, which
    the code uses for constants and class attributes; Griffe reads only string docstrings)."""
    if attribute.lineno is None or attribute.filepath not in attribute.lines_collection:  # no source: a compiled module
        return
    lines = attribute.lines_collection[attribute.filepath]
    first = attribute.lineno - 1  # the attribute's line, 0-based
    while first > 0 and lines[first - 1].strip().startswith("#:"):
        first -= 1
    comment = [line.strip().removeprefix("#:").strip() for line in lines[first : attribute.lineno - 1]]
    if comment:
        attribute.docstring = griffe.Docstring("\n".join(comment), lineno=first + 1, parent=attribute,
                                               parser=loader.docstring_parser, parser_options=loader.docstring_options)


def _front_class(
    pkg: griffe.Module, loader: griffe.GriffeLoader, name: str, rule_path: str, front_class: str, numpy: bool
) -> griffe.Class:
    """The class ``type(name, (rule, front), ...)`` of a front, as Griffe would have seen it."""
    rule_class = pkg.modules_collection.get_member(rule_path)
    text = rule_class.docstring.value if rule_class.docstring else ""
    cls = griffe.Class(name, lineno=rule_class.lineno, endlineno=rule_class.endlineno, bases=[rule_path, front_class])
    cls.docstring = griffe.Docstring(numpy_docstring(name, text) if numpy else text, lineno=rule_class.lineno, parent=cls,
                                     parser=loader.docstring_parser, parser_options=loader.docstring_options)
    return cls


def _add_classes_built_in_functions(module: griffe.Module, loader: griffe.GriffeLoader) -> None:
    """A name of ``__all__`` that the module builds on first use, as a class defined inside a
    function (``sharpness.integrations.hf.SAMTrainer``, so that the module imports without its
    framework): Griffe does not look inside functions, so the class's source is visited here."""
    missing = [name for name in module.exports or () if isinstance(name, str) and name not in module.members]
    if not missing or module.filepath is None or isinstance(module.filepath, list):
        return
    source = module.filepath.read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name in missing:
            code = textwrap.dedent(ast.get_source_segment(source, node, padded=True) or "")
            header = "\n" * (node.lineno - 1)  # keep the class's line numbers
            visited = griffe.visit(module.name, module.filepath, code=header + code,
                                   docstring_parser=loader.docstring_parser, docstring_options=loader.docstring_options)
            cls = visited.members[node.name]
            del visited.members[node.name]
            module.set_member(node.name, cls)


def _modules(obj: griffe.Object) -> list[griffe.Module]:
    return [member for member in _objects(obj) if isinstance(member, griffe.Module)]


def _objects(obj: griffe.Object) -> list[griffe.Object]:
    """Every object defined under ``obj`` (aliases left out: their targets are visited where defined)."""
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            found.extend(_objects(member))  # type: ignore[arg-type]
    return found
