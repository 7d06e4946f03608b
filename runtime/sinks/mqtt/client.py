"""The paho client of the MQTT sink: protocol, credentials, TLS, the will; and the broker's refusals that
retrying cannot fix."""

from __future__ import annotations

import os
import ssl

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from patchline.runtime.config import ConfigError
from patchline.runtime.sinks.mqtt.config import MqttConfig
from patchline.runtime.credentials import read_credential

# paho stops resending after a reconnect at its first message over the in-flight limit: keep it far above
# delivery.WINDOW x messages per verdict (6) plus availability and error messages.
PAHO_MAX_INFLIGHT = 1000
RECONNECT_DELAY_S = (1, 30)  # paho doubles the wait from the first to the second after each failure
# CONNACK refusals that retrying cannot fix: stop and report instead of hammering the broker.
FATAL_CONNACK = {
    "Bad user name or password": "check mqtt.username and the password credential",
    "Not authorized": "check mqtt.username, the password credential and the broker's ACL",
    "Client identifier not valid": "check mqtt.client_id",
    "Banned": "the broker has banned this client",
    "Bad authentication method": "check the broker's authentication settings",
    "Unsupported protocol version": "set mqtt.protocol to a version the broker supports",
}


class MqttError(ConfigError):
    """An MQTT configuration that cannot work (TLS files, credentials, topic names)."""


def make_client(config: MqttConfig, client_id: str, will_topic: str) -> paho.Client:
    """A paho client for ``config`` whose will says "offline" on ``will_topic``; its callbacks are the caller's.

    Raises MqttError for credentials or TLS files that cannot work.
    """
    v5 = config.protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else True,
    )
    client.suppress_exceptions = True
    if config.username is not None or config.password_credential is not None:
        if config.username is None:
            raise MqttError("mqtt.password_credential is set but mqtt.username is not")
        password = (read_credential(config.password_credential, "mqtt.password_credential")
                    if config.password_credential else None)
        client.username_pw_set(config.username, password)
    if config.tls is not None:
        tls = config.tls
        if tls.key_file and not tls.cert_file:
            raise MqttError("mqtt.tls.key_file is set but mqtt.tls.cert_file is not")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(tls, name)
            if path is not None and not os.access(path, os.R_OK):
                raise MqttError(f"mqtt.tls.{name}: {path} does not exist or is not readable")
        try:
            client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise MqttError(f"mqtt.tls: cannot load ca_file={tls.ca_file}, cert_file={tls.cert_file},"
                            f" key_file={tls.key_file}: {exc}") from exc
        client.tls_insecure_set(tls.insecure)
    client.will_set(will_topic, "offline", qos=1, retain=True)
    client.max_inflight_messages_set(PAHO_MAX_INFLIGHT)
    client.reconnect_delay_set(*RECONNECT_DELAY_S)
    return client
