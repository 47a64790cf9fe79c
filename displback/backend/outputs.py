"""Which output shows which guest connector: the admin's map, then first free output.

An admin names outputs per guest connector (``"<domid>/<devid>/<index>"`` or the connector's
``unique-id`` from the guest's vdispl configuration → output name); connectors nobody named
get the first output nobody else holds, in the display's order. A connector without any
output still connects (its flips complete, nothing is shown) and SET_CONFIG tells the guest
``-ENODEV``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from displback.display.interface import Output
from displback.protocol.layout import ConnectorConfig

__all__ = ["OutputMap", "OutputProvider", "connector_key"]


def connector_key(domid: int, devid: int, index: int) -> str:
    """The map key of one guest connector: ``"<domid>/<devid>/<index>"``."""
    return f"{domid}/{devid}/{index}"


class OutputProvider(Protocol):
    """Hands outputs to connectors and takes them back."""

    def acquire(self, domid: int, devid: int, connector: ConnectorConfig) -> Output | None: ...

    def release(self, output: Output) -> None: ...


class OutputMap:
    """Outputs of one display, assigned by explicit map and then in order."""

    def __init__(
        self,
        outputs: Mapping[str, Output],
        assignments: Mapping[str, str] | None = None,
        *,
        auto: bool = True,
    ) -> None:
        self._outputs = dict(outputs)
        self._assignments = dict(assignments or {})
        unknown = sorted(set(self._assignments.values()) - set(self._outputs))
        if unknown:
            raise ValueError(f"no such output: {', '.join(unknown)}")
        self._auto = auto
        self._held: dict[str, str] = {}  # output name -> connector key

    def acquire(self, domid: int, devid: int, connector: ConnectorConfig) -> Output | None:
        key = connector_key(domid, devid, connector.index)
        wanted = self._assignments.get(key)
        if wanted is None and connector.unique_id is not None:
            wanted = self._assignments.get(connector.unique_id)
        if wanted is not None:
            holder = self._held.get(wanted)
            if holder is not None and holder != key:
                return None
            self._held[wanted] = key
            return self._outputs[wanted]
        if not self._auto:
            return None
        reserved = set(self._assignments.values())
        for name, output in self._outputs.items():
            if name not in self._held and name not in reserved:
                self._held[name] = key
                return output
        return None

    def release(self, output: Output) -> None:
        self._held.pop(output.name, None)

    def holder(self, name: str) -> str | None:
        """Which connector holds output ``name`` (its key), if any."""
        return self._held.get(name)
