"""Process-wide tuning for holding many device connections, applied once at the root of
the service tree (``twistd elevgw``), each behind its own switch: the reactor's event
dispatch (``--lean-reactor``) and freezing a settled connect storm out of the garbage
collector (``--storm-freeze``)."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from elevgw.config import Settings
from elevgw.south.lean_reactor import LeanReactorService
from elevgw.south.storm_freeze import StormFreezer


def lean_services(settings: Settings, gateway_service: Any, reactor: Any) -> list[IService]:
    """The services the switches in ``settings`` ask for, for the gateway ``gateway_service``
    running on ``reactor``."""
    services: list[IService] = []
    if settings.lean_reactor:
        services.append(LeanReactorService(reactor))
    if settings.storm_freeze:
        registry = gateway_service.gateway.registry
        services.append(StormFreezer(registry.__len__, registry.on_session_ended, reactor))
    return services
