"""The ``modbus`` section of a run config: the line's Modbus TCP server (one server, a unit id per camera)."""

from __future__ import annotations

from pydantic import Field, field_validator

from patchline.runtime.config_section import Section


class ModbusConfig(Section):
    """Where the server listens and which unit id addresses which camera.

    A unit id per camera, not a register offset: every camera has the same register map, so that a PLC program
    has one function block for a camera, instanced once per camera with only its unit id changed, and the
    addresses in the README are the addresses it types. A wrong unit id is answered with an exception (gateway
    target failed to respond), where a wrong offset would silently read another camera's registers.
    """

    host: str = "127.0.0.1"  # 0.0.0.0 to serve the line's network
    # 502, Modbus's own port, is below 1024: the service needs CAP_NET_BIND_SERVICE for it (README), or take one
    # above 1023 and set it in the PLC.
    port: int = Field(502, ge=1, le=65535)
    # camera → unit id (1..247, the ids a Modbus serial line allows, so that a gateway in front can pass them on);
    # None: 1, 2, ... in the order of the line's cameras. A map must name every camera of the line.
    unit_ids: dict[str, int] | None = None
    heartbeat_s: float = Field(1.0, gt=0, le=60)  # the heartbeat register counts up this often while a camera runs

    @field_validator("unit_ids")
    @classmethod
    def _valid_unit_ids(cls, unit_ids: dict[str, int] | None) -> dict[str, int] | None:
        if unit_ids is None:
            return None
        wrong = {camera: unit for camera, unit in unit_ids.items() if not 1 <= unit <= 247}
        if wrong:
            raise ValueError(f"unit ids must be 1..247: {wrong}")
        units = list(unit_ids.values())
        repeated = sorted({unit for unit in units if units.count(unit) > 1})
        if repeated:
            raise ValueError(f"each camera needs its own unit id; repeated: {repeated}")
        return unit_ids
