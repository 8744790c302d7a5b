"""Dispatches each VM to the backend its image names (or the host's default)."""

from __future__ import annotations

from collections.abc import Mapping

from hypervisors.base import BackendError, BackendName, Hypervisor, VmInfo


class RouterHypervisor:
    """Holds one instance per configured backend and picks one per image."""

    def __init__(self, backends: Mapping[BackendName, Hypervisor], default: BackendName) -> None:
        if default not in backends:
            raise BackendError(f"default backend {default.value!r} is not configured")
        self._backends = dict(backends)
        self.default = default

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

    async def close(self) -> None:
        for backend in self._backends.values():
            await backend.close()
