"""The API reference is complete: every public name has a docstring with an example and a place on docs/api.md.

Public names are those in `lorax.__all__` and in the `__all__` of `lorax.adapters`, `lorax.peft`,
`lorax.llamacpp` and `lorax.extend` (the extension API, on docs/extending.md). Functions,
classes and modules carry a ``>>>`` example in their own docstring (a class may carry it on
its constructor or a classmethod instead); the example runs as a doctest of ``lorax/``.
Constants and type aliases (`lorax.peft.LLAMA`, `lorax.llamacpp.Names`, ...) have no
``__doc__``: their documentation is the string after their assignment, which mkdocstrings renders
and this file runs. No public docstring names a private module or object (``_src``, ``_foo``).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
from pathlib import Path

import pytest

import lorax
import lorax.adapters
import lorax.extend
import lorax.llamacpp
import lorax.peft

griffe = pytest.importorskip("griffe")

ROOT = Path(__file__).resolve().parents[2]
API_PAGE = ROOT / "docs" / "api.md"
EXTENDING_PAGE = ROOT / "docs" / "extending.md"
MODULES = {"lorax": lorax, "lorax.adapters": lorax.adapters, "lorax.peft": lorax.peft, "lorax.llamacpp": lorax.llamacpp,
           "lorax.extend": lorax.extend}
PUBLIC = [(module, name) for module, obj in MODULES.items() for name in obj.__all__]
PRIVATE_NAME = re.compile(r"(?<!\w)_[A-Za-z]\w*")


def documented_object(module: str, name: str):
    return getattr(MODULES[module], name)


def has_runtime_doc(obj) -> bool:
    return inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj)


def example_docstrings(obj) -> list[str]:
    """The docstrings that may carry a class's example: its own, its constructor's, its classmethods'."""
    docs = [inspect.getdoc(obj) or ""]
    if inspect.isclass(obj):
        docs += [inspect.getdoc(member) or "" for attr, member in vars(obj).items()
                 if attr == "__init__" or isinstance(member, classmethod)]
    return docs


@pytest.fixture(scope="module")
def package():
    """The package as the API reference loads it (with the site's griffe extension for node fields)."""
    extensions = griffe.load_extensions(f"{ROOT / 'docs' / 'hooks' / 'field_defaults.py'}:FieldDefaults")
    return griffe.load("lorax", search_paths=[ROOT], docstring_parser="google", extensions=extensions)


def griffe_object(package, path: str):
    obj = package
    for part in path.split(".")[1:]:
        obj = obj[part]
    return obj.final_target if obj.is_alias else obj


def constant_docstring(package, module: str, name: str) -> str:
    docstring = griffe_object(package, f"{module}.{name}").docstring
    return "" if docstring is None else docstring.value


def public_docstrings(module: str, name: str):
    """``(where, text)`` for the docstring of a public name and of each public member of a class."""
    obj = documented_object(module, name)
    yield f"{module}.{name}", inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        for attr in dir(obj):
            member = inspect.getattr_static(obj, attr)
            if attr.startswith("_") or getattr(member, "__module__", "lorax").split(".")[0] != "lorax":
                continue
            doc = member.fget.__doc__ if isinstance(member, property) else getattr(member, "__doc__", None)
            if isinstance(member, (classmethod, staticmethod)):
                doc = member.__func__.__doc__
            if doc and (callable(member) or isinstance(member, (property, classmethod, staticmethod))):
                yield f"{module}.{name}.{attr}", inspect.cleandoc(doc)


CLASSES = [(m, n) for m, n in PUBLIC if inspect.isclass(documented_object(m, n))]


@pytest.mark.parametrize(("module", "name"), CLASSES, ids=[f"{m}.{n}" for m, n in CLASSES])
def test_class_heading_shows_its_constructor(module, name, package):
    """Each class's rendered signature is its constructor's: the same parameters, kinds and required ones."""
    signature = inspect.signature(documented_object(module, name)).parameters.values()
    want = [(p.name, p.kind.description, p.default is inspect.Parameter.empty) for p in signature]
    init = griffe_object(package, f"{module}.{name}").all_members["__init__"]
    got = [(p.name, p.kind.value, p.default is None) for p in init.parameters if p.name != "self"]
    assert got == want


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_has_a_docstring_with_an_example(module, name, package):
    obj = documented_object(module, name)
    texts = example_docstrings(obj) if has_runtime_doc(obj) else [constant_docstring(package, module, name)]
    assert texts[0].strip(), f"{module}.{name} has no docstring"
    assert any(">>>" in text for text in texts), f"{module}.{name} has no >>> example in its docstring"


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_is_on_the_api_page(module, name):
    """On docs/api.md; the extension API on docs/extending.md (a name `lorax` also exports may
    stand there as `lorax.<name>`)."""
    page = EXTENDING_PAGE if module == "lorax.extend" else API_PAGE
    paths = [f"{module}.{name}"] + ([f"lorax.{name}"] if module == "lorax.extend" and name in lorax.__all__ else [])
    found = [path for path in paths if re.search(rf"^::: {re.escape(path)}$", page.read_text(), re.M)]
    assert found, f"{page.name} has no '::: {module}.{name}' entry"


def test_the_docs_import_nothing_from_src():
    """Guides and the extension pages reach lorax through its public modules only."""
    blocks = {str(path.relative_to(ROOT)): re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
              for path in (ROOT / "docs").rglob("*.md")}
    found = {path: [line for block in found for line in block.splitlines() if "_src" in line]
             for path, found in blocks.items()}
    assert not {path: lines for path, lines in found.items() if lines}


def test_no_public_docstring_names_a_private_object():
    found = {}
    for module, name in PUBLIC:
        for where, text in public_docstrings(module, name):
            private = sorted(set(PRIVATE_NAME.findall(text)))
            if private:
                found[where] = private
    for module, obj in MODULES.items():
        private = sorted(set(PRIVATE_NAME.findall(inspect.getdoc(obj) or "")))
        if private:
            found[module] = private
    assert not found, f"public docstrings name private objects: {found}"


def pages_directives() -> list[str]:
    text = API_PAGE.read_text() + (ROOT / "docs" / "extending.md").read_text()
    return re.findall(r"^::: ([\w.]+)$", text, re.M)


def resolve(path: str):
    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def known_references() -> set[str]:
    """Every name a docstring may point at: what the pages render (by any suffix of its path),
    and the public members of the classes they render."""
    known = set()
    for path in pages_directives():
        parts = path.split(".")
        known |= {".".join(parts[i:]) for i in range(len(parts))}
        obj = resolve(path)
        if inspect.isclass(obj):
            members = {attr for attr in dir(obj) if not attr.startswith("_")}
            known |= members | {f"{obj.__name__}.{attr}" for attr in members} | {f"{path}.{attr}" for attr in members}
    return known


REFERENCE = re.compile(r"(?<!`)`([A-Za-z][\w.]*)`(?!`)")


def test_docstring_references_are_rendered(package):
    """A `name` in a public docstring points at something the reference renders (or at another library)."""
    known, unknown = known_references(), {}
    texts = [text for module, name in PUBLIC for text in public_docstrings(module, name)]
    texts += [(module, inspect.getdoc(obj) or "") for module, obj in MODULES.items()]
    texts += [(f"{m}.{n}", constant_docstring(package, m, n)) for m, n in constants(package)]
    for where, text in texts:
        for ref in REFERENCE.findall(text):
            outside = "." in ref and ref.split(".")[0] != "lorax"  # dataclasses.field, re.fullmatch
            if not outside and ref not in known:
                unknown.setdefault(where, []).append(ref)
    assert not unknown, f"docstrings point at names the API pages do not render: {unknown}"


def test_private_name_pattern():
    text = "See `lorax._src.tracing.uses.Use`, _helper and `_foo`; not a_axes, __init__ or `_ = f()`."
    assert PRIVATE_NAME.findall(text) == ["_src", "_helper", "_foo"]


def constants(package) -> list[tuple[str, str]]:
    return [(m, n) for m, n in PUBLIC if not has_runtime_doc(documented_object(m, n))]


def test_constant_examples_run(package):
    """The examples of constants and type aliases are not ``__doc__``: run them here, as doctests."""
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    ran = 0
    for module, name in constants(package):
        test = parser.get_doctest(constant_docstring(package, module, name), {}, f"{module}.{name}", None, 0)
        ran += bool(test.examples)
        result = runner.run(test, out=lambda text: pytest.fail(text))
        assert result.failed == 0, f"{module}.{name}"
    assert ran == len(constants(package)) >= 7


def test_the_page_opens_with_the_core_verbs():
    """The reference starts with what every user calls; the extension contract lives on its own page."""
    page = API_PAGE.read_text()
    order = re.findall(r"^::: ([\w.]+)$", page, re.M)
    assert order[:10] == ["lorax.init", "lorax.lora", "lorax.split", "lorax.combine", "lorax.merge", "lorax.unmerge",
                          "lorax.optimizer", "lorax.explain", "lorax.Explanation", "lorax.Row"]
    extending = (ROOT / "docs" / "extending.md").read_text()
    assert "::: lorax.Adapter" in extending
    for method in ("layout", "merged", "create", "unmerged", "map_trained", "relayout", "take_stack"):
        assert method in extending, method
