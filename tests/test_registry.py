"""The registries of pluggable parts (fedpurel_app/registry.py): register, look up, unregister."""

import sys
import types

import pytest

from fedpurel_app.config import ConfigError, MethodConfig, knob, run_config_model
from fedpurel_app.registry import DATASETS, METHODS, PEFT_VARIANTS, Entry, Registry
from tests.conftest import make_cfg


class A:
    pass


class B:
    pass


def test_register_get_names_and_unregister():
    reg = Registry("widget", {})
    assert reg.names() == () and "one" not in reg
    assert reg.register("one")(A) is A, "the decorator returns the class unchanged"
    reg.register("two-words", dict)(B)
    assert reg.names() == ("one", "two-words") and list(reg) == ["one", "two-words"]
    assert reg.get("one") is A and reg.get("two-words") is B
    entry = reg["two-words"]
    assert entry == Entry("two-words", B, dict) and entry.field == "two_words" and reg["one"].config is None
    assert "one" in reg and "three" not in reg
    reg.unregister("one")
    assert reg.names() == ("two-words",)
    assert "one" not in reg
    reg.unregister("one")  # removing what is not there is a no-op
    assert reg.names() == ("two-words",)


def test_an_unknown_name_says_which_names_there_are():
    reg = Registry("widget", {})
    reg.register("one")(A)
    with pytest.raises(KeyError, match=r"unknown widget 'uno'; choose one of \['one'\]"):
        reg.get("uno")


def test_a_duplicate_name_is_refused_but_registering_the_same_part_again_is_not():
    reg = Registry("widget", {})
    reg.register("one")(A)
    with pytest.raises(ValueError, match="widget 'one' is already registered"):
        reg.register("one")(B)
    assert reg.get("one") is A, "the refused registration changed nothing"
    reg.register("one")(A)  # a module imported twice registers the same class twice
    assert reg.names() == ("one",)
    reg.unregister("one")
    reg.register("one")(B)  # after unregister the name is free again
    assert reg.get("one") is B


@pytest.mark.parametrize("name", ["One", "two_words", "-x", "x-", "a--b", "1a", "", "a b"])
def test_names_are_lowercase_words_joined_by_dashes(name):
    reg = Registry("widget", {})
    with pytest.raises(ValueError, match="lowercase words joined by '-'"):
        reg.register(name)
    assert reg.names() == ()


def test_every_change_bumps_the_version():
    reg = Registry("widget", {})
    v0 = reg.version
    reg.register("one")(A)
    v1 = reg.version
    reg.register("one")(A)
    reg.unregister("one")
    v2 = reg.version
    reg.unregister("one")
    assert v0 < v1 < v2 and reg.version == v2, "a no-op unregister changes nothing"


def test_builtin_modules_are_imported_on_first_use(tmp_path, monkeypatch):
    holder = types.ModuleType("_fedpurel_registry_holder")
    holder.REG = Registry("widget", {"lazy": "_fedpurel_registry_part"})
    monkeypatch.setitem(sys.modules, holder.__name__, holder)
    (tmp_path / "_fedpurel_registry_part.py").write_text(
        "import _fedpurel_registry_holder as h\n\n\n@h.REG.register('lazy')\nclass Lazy:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "_fedpurel_registry_part", raising=False)
    assert "_fedpurel_registry_part" not in sys.modules, "creating a registry imports nothing"
    assert holder.REG.names() == ("lazy",) and "lazy" in holder.REG
    assert "_fedpurel_registry_part" not in sys.modules, "its names are known without importing the parts"
    assert holder.REG.get("lazy").__name__ == "Lazy"
    assert "_fedpurel_registry_part" in sys.modules, "asking for the part imports its module"


def test_the_builtin_parts():
    assert PEFT_VARIANTS.names() == ("prompt", "adapter", "lora")
    assert set(METHODS.names()) == {
        "zero-shot",
        "promptfl",
        "promptfl-la",
        "fedpurel",
        "fedpurel-kl",
        "pft",
        "lp-ft",
        "promptfolio",
        "fed-grab",
    }
    assert {
        "mnist",
        "mnist-animals",
        "mnist-animals-blur",
        "cifar10-lt",
        "cifar100-lt",
        "imagenet-lt",
        "places-lt",
    } == set(DATASETS)
    from fedpurel_app.peft.adapter import AdapterConfig, AdapterPeft
    from fedpurel_app.peft.lora import LoraOptions, LoraPeft
    from fedpurel_app.peft.prompt import PromptConfig, PromptPeft

    for name, impl, config in (
        ("prompt", PromptPeft, PromptConfig),
        ("adapter", AdapterPeft, AdapterConfig),
        ("lora", LoraPeft, LoraOptions),
    ):
        assert PEFT_VARIANTS.get(name) is impl and PEFT_VARIANTS[name].config is config


class ToyConfig(MethodConfig):
    """A toy method's own knobs."""

    strength: float = knob(0.5, "how strong", role="training", ge=0.0)


def test_a_registered_method_gets_its_own_section_of_the_run_config():
    from fedpurel_app.methods.promptfl import PromptFL

    @METHODS.register("toy-method", ToyConfig)
    class Toy(PromptFL):
        pass

    try:
        cfg = make_cfg({"method.name": "toy-method", "method.toy-method.strength": 2.0})
        assert cfg.method.options == ToyConfig(strength=2.0) and cfg.method.toy_method.strength == 2.0
        assert cfg.to_flower()["method.toy-method.strength"] == 2.0
        with pytest.raises(ConfigError, match="key 'method.toy-method.strength'"):
            make_cfg({"method.toy-method.strength": -1.0})
        with pytest.raises(ValueError, match="already registered"):
            METHODS.register("toy-method", ToyConfig)(PromptFL)
    finally:
        METHODS.unregister("toy-method")
    assert "toy-method" not in METHODS
    with pytest.raises(ConfigError, match="unknown method"):
        make_cfg({"method.name": "toy-method"})
    with pytest.raises(ConfigError, match="unknown key 'method.toy-method"):
        make_cfg({"method.toy-method.strength": 2.0})


def test_the_run_config_model_follows_the_registries():
    # Load the built-ins first: the model's cache key is read before run_config_model() loads
    # them, so the very first call of a process caches its model under a stale key (reported).
    for registry in (PEFT_VARIANTS, METHODS, DATASETS):
        registry.names()
    model = run_config_model()
    assert run_config_model() is model, "cached while no registry changes"

    @METHODS.register("toy-two")
    class Toy:
        pass

    try:
        assert run_config_model() is not model
        assert "toy_two" in run_config_model().model_fields["method"].annotation.model_fields
    finally:
        METHODS.unregister("toy-two")
    assert "toy_two" not in run_config_model().model_fields["method"].annotation.model_fields
