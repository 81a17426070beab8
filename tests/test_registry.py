"""The registries' three ways to name a thing (a built-in or installed entry point, "package.module:attr",
"file.py:attr"), and the one sentence for each way of getting it wrong."""

from __future__ import annotations

import sys

import pytest

from gptcli.errors import GptError
from gptcli.registry import REGISTRIES, Registry, entry_points, is_reference


def registry() -> Registry:
    return Registry("widget", "section.widget", "gptcli.test_widgets", {"plain": "json:dumps", "broken": "json:nothing"})


def test_a_builtin_resolves_to_the_object_it_names():
    import json

    assert registry().resolve("plain") is json.dumps


def test_a_module_reference_resolves_and_a_bad_one_is_one_sentence():
    import os.path

    assert registry().resolve("os.path:join") is os.path.join
    with pytest.raises(GptError, match=r'section.widget = "no_such_module_xyz:f": cannot import no_such_module_xyz'):
        registry().resolve("no_such_module_xyz:f")
    with pytest.raises(GptError, match=r"json has no nothing"):
        registry().resolve("broken")


def test_a_file_reference_is_read_beside_the_project_file(tmp_path):
    (tmp_path / "mine.py").write_text("VALUE = 41 + 1\n")
    assert registry().resolve("mine.py:VALUE", base_dir=tmp_path) == 42
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    with pytest.raises(GptError, match=r'section.widget = "mine.py:VALUE" names .*other/mine.py, which is not a file'):
        registry().check("mine.py:VALUE", base_dir=elsewhere)


def test_two_files_of_one_name_are_two_modules(tmp_path):
    for name, value in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "plugin.py").write_text(f"VALUE = {value}\n")
    assert registry().resolve("a/plugin.py:VALUE", tmp_path) == 1
    assert registry().resolve("b/plugin.py:VALUE", tmp_path) == 2


def test_a_file_that_fails_or_lacks_the_name_is_one_sentence(tmp_path):
    (tmp_path / "fails.py").write_text("raise RuntimeError('no GPU here\\nsecond line')\n")
    (tmp_path / "empty.py").write_text("")
    with pytest.raises(GptError, match=r"running .*fails.py failed: RuntimeError: no GPU here\.$"):
        registry().resolve("fails.py:X", tmp_path)
    with pytest.raises(GptError, match=r"empty.py defines no X\."):
        registry().resolve("empty.py:X", tmp_path)


def test_an_unknown_name_lists_what_there_is_and_the_nearest():
    with pytest.raises(GptError) as error:
        registry().check("plian")
    message = str(error.value)
    assert 'section.widget names "plian", which is not a widget (built in: plain, broken;' in message
    assert '(did you mean "plain"?)' in message and "\n" not in message


def test_references_are_told_from_names():
    assert is_reference("pkg.mod:attr") and is_reference("masks.py:my_pattern") and is_reference("sub/dir/x.py:A.b")
    assert not is_reference("causal") and not is_reference("adamw")


def test_an_installed_entry_point_is_a_name(tmp_path, monkeypatch):
    """A package installed with an entry point in the registry's group: its name is accepted and resolves.
    (The dist-info on sys.path is what pip writes for an installed package.)"""
    info = tmp_path / "widgets_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: widgets-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gptcli.test_widgets]\nfancy = widgets_plugin_module:FANCY\n")
    (tmp_path / "widgets_plugin_module.py").write_text("FANCY = 'fancy widget'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_points.cache_clear()
    try:
        widgets = registry()
        assert widgets.names() == ["plain", "broken", "fancy"]
        assert widgets.resolve("fancy") == "fancy widget"
        assert "installed: fancy" in widgets.known()
    finally:
        entry_points.cache_clear()
        sys.modules.pop("widgets_plugin_module", None)


@pytest.mark.parametrize("kind,name", [(kind, name) for kind, r in REGISTRIES.items() for name in r.builtins])
def test_every_builtin_of_every_registry_resolves(kind, name):
    """The built-ins are named by reference; each must exist where it is named."""
    assert REGISTRIES[kind].resolve(name) is not None
