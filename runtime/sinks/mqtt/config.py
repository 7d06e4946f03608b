"""The ``mqtt`` section of a run config: the broker connection every camera's MQTT sink makes (and other outputs
that speak MQTT, such as Sparkplug B, may reuse)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from patchline.runtime.config_section import Section


class TlsConfig(Section):
    ca_file: str | None = None
    cert_file: str | None = None  # client certificate, for brokers that require mutual TLS
    key_file: str | None = None
    insecure: bool = False  # skip hostname check: only for commissioning against a broker with an IP-only cert


class MqttConfig(Section):
    """Broker connection; secrets come from the environment or systemd credentials, never the YAML."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str | None = None  # default: patchline-<camera>
    topic_prefix: str = "patchline"
    protocol: Literal["3.1.1", "5"] = "5"
    keepalive_s: int = Field(30, ge=5)
    username: str | None = None
    # Name of the password: read from $CREDENTIALS_DIRECTORY/<name> (systemd LoadCredential) or env var <name>.
    password_credential: str | None = None
    tls: TlsConfig | None = None
    queue_max_count: int = Field(10000, ge=1)  # verdicts held while the broker is unreachable
    queue_max_age_s: float = Field(3600.0, gt=0)
    spool_dir: str | None = None  # default: the daemon's state directory
