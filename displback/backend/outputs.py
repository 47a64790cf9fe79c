"""Which output shows which guest connector: the admin's map, then first free output.

An admin names outputs per guest connector (``"<domid>/<devid>/<index>"`` or the connector's
``unique-id`` from the guest's vdispl configuration → output name); connectors nobody named
get the first output nobody else holds, in the display's order. A connector without any
output still connects (its flips complete, nothing is shown) and SET_CONFIG tells the guest
``-ENODEV``.

No guest can choose what it is keyed by: the connector key comes from the device's place in
XenStore (its domain id and device id, which the guest cannot pick) and the unique-id is
only ever one the toolstack wrote (``protocol.trust``: a device whose ``unique-id`` the guest
wrote is refused before it asks for outputs). The two kinds of keys are kept apart — a map
key shaped ``<domid>/<devid>/<index>`` only ever matches that connector, never a unique-id
that happens to read the same (``/`` is allowed in a unique-id). A unique-id the admin gave
to connectors of two guests names one output for both: whoever connects first holds it and
the other gets none while it does (assign by connector key to avoid that).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Protocol

from displback.display.interface import Output
from displback.protocol.layout import ConnectorConfig

__all__ = ["OutputMap", "OutputProvider", "connector_key", "is_connector_key"]

_CONNECTOR_KEY: Final = re.compile(r"[0-9]+/[0-9]+/[0-9]+")


def connector_key(domid: int, devid: int, index: int) -> str:
    """The map key of one guest connector: ``"<domid>/<devid>/<index>"``."""
    return f"{domid}/{devid}/{index}"


def is_connector_key(key: str) -> bool:
    """Whether a map key names a connector by place (``"<domid>/<devid>/<index>"``) rather
    than by unique-id."""
    return _CONNECTOR_KEY.fullmatch(key) is not None


class OutputProvider(Protocol):
    """Hands outputs to connectors and takes them back."""

    def acquire(
        self, domid: int, devid: int, connector: ConnectorConfig, guest: str | None = None
    ) -> Output | None:
        """The output connector ``index`` of ``domid``'s device ``devid`` is shown on (None:
        none); ``guest`` is the domain's name, for a display that titles what it shows."""
        ...

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
        self._by_key = {k: v for k, v in self._assignments.items() if is_connector_key(k)}
        self._by_unique_id = {
            k: v for k, v in self._assignments.items() if not is_connector_key(k)
        }
        unknown = sorted(set(self._assignments.values()) - set(self._outputs))
        if unknown:
            raise ValueError(f"no such output: {', '.join(unknown)}")
        self._auto = auto
        self._held: dict[str, str] = {}  # output name -> connector key

    def acquire(
        self, domid: int, devid: int, connector: ConnectorConfig, guest: str | None = None
    ) -> Output | None:
        key = connector_key(domid, devid, connector.index)
        wanted = self._by_key.get(key)
        if wanted is None and connector.unique_id is not None:
            wanted = self._by_unique_id.get(connector.unique_id)
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
