"""Dispatches each VM to the backend its image names (or the host's default).

Only backends that some image uses are built, so the default backend may be absent (a
host whose images all name `noop` or `zones` never connects to libvirt).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet

from hypervisors.base import BackendError, BackendName, Hypervisor, VmInfo


class RouterHypervisor:
    """Holds one instance per configured backend and picks one per image."""

    def __init__(self, backends: Mapping[BackendName, Hypervisor], default: BackendName) -> None:
        self._backends = dict(backends)
        self.default = default

    def add(self, backend: Hypervisor) -> None:
        """A backend built later (an image map reloaded with an image that needs it)."""
        self._backends[backend.name] = backend

    def backend_for(self, requested: BackendName | None) -> Hypervisor:
        name = requested or self.default
        try:
            return self._backends[name]
        except KeyError:
            configured = ", ".join(sorted(b.value for b in self._backends))
            raise BackendError(
                f"backend {name.value!r} is not available on this host (configured: {configured})"
            ) from None

    @property
    def backends(self) -> Mapping[BackendName, Hypervisor]:
        return self._backends

    async def list_ours(self) -> list[VmInfo]:
        found: list[VmInfo] = []
        for backend in self._backends.values():
            found.extend(await backend.list_ours())
        return found

    async def leftovers(self, live_vms: AbstractSet[str]) -> list[str]:
        removed: list[str] = []
        for backend in self._backends.values():
            removed.extend(await backend.leftovers(live_vms))
        return removed

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()
