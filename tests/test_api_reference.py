"""The API reference's tools, without building the site (mkdocs.yml; ``.ci/run`` builds it):
tools/check_api_docs.py fails on a public name the built site leaves out, and the build's helpers
(tools/mkdocs_api_pages.py, tools/griffe_sharpness.py) generate a page per method and turn the
docstrings' Sphinx roles into links."""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path
from types import ModuleType

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if not (TOOLS.parent / "python" / "sharpness").exists():  # pragma: no cover - tests beside an installed wheel
    pytest.skip("the API reference is checked against the sources (python/, tools/): not a source checkout",
                allow_module_level=True)


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = load_tool("check_api_docs")


def fake_site(root: Path, names: list[str]) -> Path:
    """A site as mkdocs + mkdocstrings write it: ``objects.inv`` (zlib-compressed, one line per
    name, ``$`` standing for the name in the URL) and a page with each name's anchor."""
    lines = [f"{name} py:class 1 api/page/#$ -" for name in names]
    header = b"# Sphinx inventory version 2\n# Project: sharpness\n# Version: 0.0.0\n# The rest is compressed with zlib.\n"
    (root / "objects.inv").write_bytes(header + zlib.compress("\n".join(lines).encode()))
    (root / "api" / "page").mkdir(parents=True)
    anchors = "".join(f'<h2 id="{name}">{name}</h2>' for name in names)
    (root / "api" / "page" / "index.html").write_text(f"<html><body>{anchors}</body></html>", encoding="utf-8")
    return root


def test_public_names_cover_both_fronts_and_the_lazy_modules():
    import sharpness
    import sharpness.numpy

    names = check.public_names()
    assert {f"sharpness.{name}" for name in sharpness.__all__} <= set(names)
    assert {f"sharpness.numpy.{name}" for name in sharpness.numpy.__all__} <= set(names)
    assert "sharpness.measure" in names  # exposed by `import sharpness` outside __all__
    assert "sharpness.measure.m_sharpness" in names and "sharpness.integrations.hf.SAMTrainer" in names


def test_the_check_passes_on_a_site_documenting_every_name(tmp_path, capsys):
    fake_site(tmp_path, check.public_names())
    assert check.main([str(tmp_path)]) == 0
    assert "public names documented" in capsys.readouterr().out


@pytest.mark.parametrize("left_out", ["sharpness.LookSAM", "sharpness.numpy.SAM", "sharpness.measure", "sharpness.__version__"])
def test_the_check_fails_on_a_name_left_out_of_the_site(tmp_path, capsys, left_out):
    names = check.public_names()
    assert left_out in names
    fake_site(tmp_path, [name for name in names if name != left_out])
    assert check.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"\n  {left_out}\n" in out and "1 public name(s) missing" in out


def test_a_name_in_the_inventory_without_its_anchor_is_missing(tmp_path):
    site = fake_site(tmp_path, ["sharpness.SAM", "sharpness.LookSAM"])
    page = site / "api" / "page" / "index.html"
    page.write_text(page.read_text(encoding="utf-8").replace('id="sharpness.LookSAM"', 'id="other"'), encoding="utf-8")
    assert check.undocumented(site, ["sharpness.SAM", "sharpness.LookSAM"]) == ["sharpness.LookSAM"]
    page.unlink()
    assert check.undocumented(site, ["sharpness.SAM"]) == ["sharpness.SAM"]


def test_the_inventory_is_read_with_explicit_and_implicit_anchors(tmp_path):
    body = "sharpness.SAM py:class 1 api/sam/#$ -\nsharpness.SAF py:class 2 api/regularizers/#sharpness.regularizers.SAF -\n"
    header = b"# Sphinx inventory version 2\n# Project: x\n# Version: 0\n# zlib\n"
    (tmp_path / "objects.inv").write_bytes(header + zlib.compress(body.encode()))
    assert check.read_inventory(tmp_path) == {
        "sharpness.SAM": "api/sam/#sharpness.SAM",
        "sharpness.SAF": "api/regularizers/#sharpness.regularizers.SAF",
    }


def test_module_names_come_from_all_or_from_the_public_definitions(tmp_path):
    with_all = tmp_path / "with_all.py"
    with_all.write_text('import os\n__all__ = ["b", "A"]\ndef b(): pass\nclass A: pass\ndef c(): pass\n', encoding="utf-8")
    without = tmp_path / "without.py"
    without.write_text("from os import path\nX = 1\ndef f(): pass\nclass _Hidden: pass\nclass K: pass\n", encoding="utf-8")
    assert check.module_names(with_all) == ["b", "A"]
    assert check.module_names(without) == ["f", "K"]


def test_every_method_module_gets_a_page():
    pytest.importorskip("mkdocs")
    pytest.importorskip("griffe")
    from sharpness.methods import every_method

    pages = load_tool("mkdocs_api_pages").pages()
    for name, rule in every_method().items():
        path = f"api/methods/{rule.__module__.rsplit('.', 1)[-1]}.md"
        assert path in pages and f"::: sharpness.{name}\n" in pages[path][1], name


def test_sphinx_roles_become_links_or_code():
    pytest.importorskip("griffe")
    roles = load_tool("griffe_sharpness")
    text = "Use :class:`~sharpness.optim.SAM`, :meth:`first_step` and :func:`torch.no_grad`::\n\n    code\n\n"
    text += "Example:\n    >>> 1\n"
    resolved = {"sharpness.optim.SAM": "sharpness.optim.sam.SAM", "first_step": "sharpness.optim.sam.SAM.first_step"}
    assert roles.sphinx_roles_to_crossrefs(text, resolved.get) == (
        "Use [`SAM`][sharpness.optim.sam.SAM], [`first_step`][sharpness.optim.sam.SAM.first_step] and `torch.no_grad`:"
        "\n\n    code\n\nExamples:\n    >>> 1\n"
    )


def test_the_classes_built_at_import_are_in_the_documented_tree():
    griffe = pytest.importorskip("griffe")
    extensions = griffe.load_extensions(f"{TOOLS / 'griffe_sharpness.py'}:DynamicMethodClasses")
    source = str(TOOLS.parent / "python")
    package = griffe.load("sharpness", search_paths=[source], extensions=extensions, docstring_parser="google")
    looksam = package["LookSAM"].final_target  # `import sharpness` exposes it lazily from sharpness.optim
    assert looksam.path == "sharpness.optim.LookSAM"
    assert [base.path for base in looksam.resolved_bases] == ["sharpness.methods.looksam.LookSAM", "sharpness.optim.sam.SAM"]
    assert {"k", "alpha", "variant"} <= {parameter.name for parameter in looksam.all_members["__init__"].parameters}
    assert looksam.docstring.value.startswith("LookSAM (Liu et al.")
    assert "[`sharpness.LookSAM`][sharpness.optim.LookSAM]" in package["numpy.LookSAM"].docstring.value
    # a role naming a front's method from a rule's docstring links to the torch front's
    assert "[`SAM.first_step`][sharpness.optim.sam.SAM.first_step]" in package["optim.EveryKSAM"].docstring.value
    assert package["integrations.hf.SAMTrainer"].docstring.value.startswith("A ``transformers.Trainer``")
