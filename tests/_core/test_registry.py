import pytest

from slimx._core.errors import UsageError
from slimx._core.registry import Registry


def test_register_get_alias_and_list():
    reg = Registry("thing")
    reg.add("alpha", 1, aliases=("a",))
    reg.add("beta", 2)
    assert reg.get("ALPHA") == 1 and reg.get("a") == 1
    assert reg.names() == ["alpha", "beta"]
    assert reg.aliases_of("alpha") == ["a"]
    assert "a" in reg and "gamma" not in reg


def test_duplicates_refused():
    reg = Registry("thing")
    reg.add("alpha", 1, aliases=("a",))
    with pytest.raises(ValueError, match="twice"):
        reg.add("alpha", 2)
    with pytest.raises(ValueError, match="twice"):
        reg.add("other", 3, aliases=("a",))


def test_unknown_name_is_a_usage_error_with_a_suggestion():
    reg = Registry("device")
    reg.add("iphone12", 1)
    with pytest.raises(UsageError) as info:
        reg.get("iphone13")
    assert info.value.exit_code == 2
    assert "did you mean 'iphone12'" in info.value.line()
    assert "\n" not in info.value.line()
