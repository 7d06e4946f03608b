"""The ``sparkplug`` section of a run config: the line as one Sparkplug B edge node, its cameras as devices."""

from __future__ import annotations

from pydantic import Field

from patchline.runtime.config_section import Section
from patchline.runtime.sinks.mqtt.config import MqttConfig

# Sparkplug B 3.0: group, node and device ids are UTF-8 without the MQTT wildcards and the topic separator.
SPARKPLUG_ID = r"^[^+#/]+$"


class SparkplugConfig(Section):
    """The edge node; its broker is the ``mqtt`` section's unless ``broker`` names another."""

    group_id: str = Field("patchline", pattern=SPARKPLUG_ID)
    edge_node_id: str | None = Field(None, pattern=SPARKPLUG_ID)  # default: the line's name
    # The host application whose STATE gates the births (Sparkplug 3.0 primary host); None: birth at connection.
    primary_host_id: str | None = Field(None, pattern=SPARKPLUG_ID)
    # None: the `mqtt` section's host, port, protocol, TLS and credentials, on a connection of its own
    # (client id patchline-<line>-sparkplug).
    broker: MqttConfig | None = None
    # DDATA per camera held while the node is not born (broker away, primary host offline); beyond, the oldest go.
    queue_max_count: int = Field(1000, ge=1)
