"""The routine registry: names, module:Class lookups, entry-point plugins and their failures."""
import sys
import textwrap

import pytest

import pipert
from pipert import MiddleRoutine, RegistryError, SourceRoutine, registry


@pytest.fixture
def clean_registry(monkeypatch):
    """A registry that has not loaded plugins yet; the real one comes back after the test."""
    monkeypatch.setattr(registry, "_routines", {})
    monkeypatch.setattr(registry, "_failures", {})
    monkeypatch.setattr(registry, "_loaded", False)
    registry._distributions.cache_clear()
    yield
    registry._distributions.cache_clear()


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A directory on sys.path where a test writes modules and installed-distribution metadata."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("regplug"):
            del sys.modules[name]


def install(directory, distribution, modules, entry_points):
    """Write ``modules`` and a dist-info declaring ``entry_points`` (name = value) in group pipert.routines."""
    for name, source in modules.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(source))
    info = directory / f"{distribution.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[pipert.routines]\n{lines}")
    (info / "top_level.txt").write_text("".join(f"{name}\n" for name in modules))


def test_register_makes_a_class_known_by_name(clean_registry):
    @pipert.register("probe-source")
    class Probe(SourceRoutine):
        def main_logic(self):
            return 1

    assert registry.lookup("probe-source") is Probe
    assert registry.name_of(Probe) == "probe-source"
    assert registry.routines()["probe-source"].cls is Probe


def test_register_refuses_what_is_not_a_routine(clean_registry):
    with pytest.raises(RegistryError, match="not a routine class"):
        pipert.register("thing")(dict)
    with pytest.raises(RegistryError, match="non-empty name"):
        pipert.register("")


def test_a_name_registered_twice_names_both_origins(clean_registry):
    @pipert.register("twice")
    class First(MiddleRoutine):
        pass

    with pytest.raises(RegistryError) as caught:
        @pipert.register("twice")
        class Second(MiddleRoutine):
            pass
    message = str(caught.value)
    assert "routine name 'twice' is registered twice" in message
    assert "test_registry:test_a_name_registered_twice_names_both_origins.<locals>.First" in message
    assert "test_registry:test_a_name_registered_twice_names_both_origins.<locals>.Second" in message


def test_lookup_by_module_and_class():
    from helpers import AddOne
    assert registry.lookup("helpers:AddOne") is AddOne
    with pytest.raises(RegistryError, match="cannot import module 'no_such_module'"):
        registry.lookup("no_such_module:Thing")
    with pytest.raises(RegistryError, match="module 'helpers' has no 'Nothing'"):
        registry.lookup("helpers:Nothing")
    with pytest.raises(RegistryError, match="not a routine class"):
        registry.lookup("helpers:wait_for")


def test_unknown_name_lists_the_known_ones(clean_registry):
    with pytest.raises(RegistryError, match="there is no routine type 'nope': use a registered name"):
        registry.lookup("nope")


def test_builtin_package_is_imported(clean_registry, monkeypatch):
    imported = []
    monkeypatch.setattr(registry, "_load_builtin", lambda: imported.append(True))
    registry.routines()
    registry.routines()
    assert imported == [True]


def test_entry_points_load_modules_and_classes_and_a_failure_spares_the_others(clean_registry, plugin_dir):
    install(plugin_dir, "regplug-good", {
        "regplug_mod": """
            import pipert
            from pipert import Param, SourceRoutine

            @pipert.register("regplug-counter")
            class Counter(SourceRoutine):
                step = Param(int, default=1)

                def main_logic(self):
                    return {"n": self.step}
        """,
        "regplug_cls": """
            from pipert import MiddleRoutine

            class Double(MiddleRoutine):
                def main_logic(self, data):
                    return data
        """,
    }, {"regplug-mod": "regplug_mod", "regplug-double": "regplug_cls:Double"})
    install(plugin_dir, "regplug-broken", {"regplug_broken": "raise RuntimeError('no camera driver')\n"},
            {"regplug-broken": "regplug_broken"})
    found = registry.routines()
    assert found["regplug-counter"].package == "regplug-good"
    assert found["regplug-double"].cls.__name__ == "Double"
    assert found["regplug-double"].package == "regplug-good"
    failures = registry.failures()
    assert failures == {"regplug-broken = regplug_broken (package regplug-broken)": "RuntimeError: no camera driver"}
    with pytest.raises(RegistryError, match="plugins that failed to load: regplug-broken"):
        registry.lookup("regplug-missing")


def test_a_plugin_clashing_with_another_fails_naming_both(clean_registry, plugin_dir):
    body = """
        import pipert
        from pipert import SourceRoutine

        @pipert.register("regplug-camera")
        class Camera(SourceRoutine):
            def main_logic(self):
                return 1
    """
    install(plugin_dir, "regplug-one", {"regplug_one": body}, {"one": "regplug_one"})
    install(plugin_dir, "regplug-two", {"regplug_two": body}, {"two": "regplug_two"})
    assert "regplug-camera" in registry.routines()
    [(plugin, error)] = registry.failures().items()
    assert "routine name 'regplug-camera' is registered twice" in error
    assert "regplug_one:Camera (package regplug-one)" in error and "regplug_two:Camera (package regplug-two)" in error
