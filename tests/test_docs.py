"""The docs keep up with the code: every hook is documented, every built-in strategy has a page."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from decodekit import hookspecs
from decodekit.manager import BUILTIN_DIST

DOCS = Path(__file__).resolve().parent.parent / "docs"


def all_hooks() -> list[tuple[str, str]]:
    """(family, hook name) for every hook spec of decodekit."""
    out = []
    for family in (hookspecs.RegistrationSpecs, hookspecs.RuntimeSpecs):
        out += [(family.__name__, n) for n in vars(family) if n.startswith("decodekit_")]
    return out


def test_hookspecs_found():
    names = [n for _, n in all_hooks()]
    assert "decodekit_register_strategies" in names and "decodekit_step_end" in names


@pytest.mark.parametrize("family, hook", all_hooks())
def test_hook_has_docstring_and_is_rendered_on_the_hooks_page(family, hook):
    fn = getattr(getattr(hookspecs, family), hook)
    doc = inspect.getdoc(fn)
    assert doc, f"{family}.{hook} has no docstring in core/hookspecs.py"
    assert "Called by:" in doc, f"{family}.{hook}'s docstring does not say who calls it"
    # The page renders each spec class with mkdocstrings, so every hook in it appears there.
    page = (DOCS / "hooks.md").read_text()
    assert re.search(rf"^::: decodekit\.hookspecs\.{family}$", page, flags=re.M), (
        f"docs/hooks.md does not render decodekit.hookspecs.{family}"
    )


def builtin_strategies():
    """Strategies registered by the `decodekit` distribution itself, third-party plugins excluded."""
    from decodekit.manager import PluginManager

    manager = PluginManager()
    return sorted(
        (name, cls)
        for name, cls in manager.registry.strategies.items()
        if manager.origin("strategies", name).package == BUILTIN_DIST
    )


def test_there_are_builtin_strategies():
    assert builtin_strategies(), (
        "no built-in strategy is registered; is decodekit installed (pip install -e .)?"
    )


@pytest.mark.parametrize("name, cls", builtin_strategies())
def test_strategy_page_mentions_every_param(name, cls):
    page = DOCS / "strategies" / f"{name}.md"
    assert page.exists(), f"built-in strategy {name!r} has no page docs/strategies/{name}.md"
    text = page.read_text()
    missing = [p for p in cls.Params.model_fields if not re.search(rf"\b{p}\b", text)]
    assert not missing, f"docs/strategies/{name}.md does not mention params {missing}"


@pytest.mark.parametrize("front", ["README.md", "docs/index.md"])
def test_every_builtin_strategy_is_in_the_front_pages_table(front):
    """README's and the docs home's strategy tables list every built-in strategy, and no plan."""
    text = (DOCS.parent / front).read_text()
    missing = [
        name for name, _ in builtin_strategies() if not re.search(rf"\|[^\n]*`{name}`", text)
    ]
    assert not missing, f"{front}'s strategy table does not list {missing}"
    assert "not yet available" not in text, f"{front} still names available strategies as planned"


def test_every_strategy_page_is_in_the_nav():
    nav = (DOCS.parent / "mkdocs.yml").read_text()
    for page in sorted((DOCS / "strategies").glob("*.md")):
        assert f"strategies/{page.name}" in nav, (
            f"docs/strategies/{page.name} is not in mkdocs.yml nav"
        )


SPHINX_ROLE = re.compile(r":(class|func|meth|data|mod|attr|obj|exc):`")


def test_no_sphinx_roles_in_docstrings():
    """mkdocstrings renders ``:class:`X``` literally: use `X` or [X][decodekit.module.X]."""
    import decodekit
    import decodekit.pipelines
    import decodekit.plugins

    files = {
        f
        for pkg in (decodekit, decodekit.plugins, decodekit.pipelines)
        for folder in pkg.__path__
        for f in Path(folder).rglob("*.py")
    }
    assert len(files) > 20
    found = [
        f"{f.name}:{i}: {line.strip()}"
        for f in sorted(files)
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1)
        if SPHINX_ROLE.search(line)
    ]
    assert not found, "\n".join(found)
