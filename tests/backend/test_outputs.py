"""Connectors get the outputs the admin named, then the first free ones."""

from types import SimpleNamespace
from typing import Any

import pytest

from displback.backend.outputs import OutputMap, connector_key
from displback.protocol.layout import ConnectorConfig


def outputs(*names: str) -> dict[str, Any]:
    return {name: SimpleNamespace(name=name) for name in names}


def conn(index: int, uid: str | None = None) -> ConnectorConfig:
    return ConnectorConfig(index, 800, 600, uid)


def got(output: Any) -> str:
    assert output is not None, "no output was handed out"
    return str(output.name)


def test_named_outputs_go_to_their_connectors_and_others_fill_in_order() -> None:
    omap = OutputMap(outputs("A", "B", "C"), {connector_key(5, 0, 1): "A", "pilot": "C"})
    assert got(omap.acquire(5, 0, conn(1))) == "A"
    assert got(omap.acquire(7, 0, conn(0, "pilot"))) == "C"
    assert got(omap.acquire(5, 0, conn(0))) == "B"
    assert omap.acquire(6, 0, conn(0)) is None  # all taken


def test_a_released_output_can_be_acquired_again() -> None:
    omap = OutputMap(outputs("A"))
    first = omap.acquire(1, 0, conn(0))
    assert first is not None and omap.acquire(2, 0, conn(0)) is None
    omap.release(first)
    assert got(omap.acquire(2, 0, conn(0))) == "A"
    assert omap.holder("A") == "2/0/0"


def test_a_named_output_is_not_handed_to_a_stranger_nor_to_a_second_holder() -> None:
    omap = OutputMap(outputs("A"), {"1/0/0": "A"})
    assert omap.acquire(2, 0, conn(0)) is None
    assert got(omap.acquire(1, 0, conn(0))) == "A"


def test_unknown_output_names_are_refused() -> None:
    with pytest.raises(ValueError, match="no such output: Z"):
        OutputMap(outputs("A"), {"1/0/0": "Z"})


def test_without_auto_only_named_connectors_get_outputs() -> None:
    omap = OutputMap(outputs("A", "B"), {"1/0/0": "A"}, auto=False)
    assert omap.acquire(2, 0, conn(0)) is None


def test_a_unique_id_shaped_like_a_connector_key_does_not_take_that_connectors_output() -> None:
    """``/`` may appear in a unique-id: ``"2/0/0"`` as guest 1's id must not match the map key
    the admin wrote for guest 2's connector."""
    omap = OutputMap(outputs("A", "B"), {"2/0/0": "B"})
    assert got(omap.acquire(1, 0, conn(0, "2/0/0"))) == "A"
    assert got(omap.acquire(2, 0, conn(0))) == "B"


def test_a_unique_id_two_connectors_share_is_held_by_one_at_a_time() -> None:
    omap = OutputMap(outputs("A", "B"), {"shared": "B"})
    first = omap.acquire(1, 0, conn(0, "shared"))
    assert got(first) == "B"
    assert omap.acquire(2, 0, conn(0, "shared")) is None  # not B, and not a free one either
    assert first is not None
    omap.release(first)
    assert got(omap.acquire(2, 0, conn(0, "shared"))) == "B"


def test_a_connector_named_by_place_keeps_its_output_whatever_its_unique_id() -> None:
    """The place (domid/devid/index) is looked up first; the unique-id only when the place
    names nothing."""
    omap = OutputMap(outputs("A", "B"), {connector_key(5, 0, 0): "A"})
    assert got(omap.acquire(5, 0, conn(0, "unassigned-id"))) == "A"


def test_releasing_an_output_no_connector_holds_changes_nothing() -> None:
    omap = OutputMap(outputs("A", "B"))
    a = omap.acquire(1, 0, conn(0))
    assert a is not None
    omap.release(a)
    omap.release(a)  # a connector torn down twice (a reset during teardown)
    assert omap.holder("A") is None and got(omap.acquire(2, 0, conn(0))) == "A"
