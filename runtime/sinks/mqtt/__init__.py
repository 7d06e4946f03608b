"""The MQTT sink: verdicts out to the line's PLCs, triggers in (paho-mqtt 2.x, callback API version 2).

    client.py    the paho client: protocol, credentials, TLS, the will; CONNACK refusals that retrying cannot fix
    topics.py    the topic layout under ``<topic_prefix>/<camera>/``
    delivery.py  the ordered, bounded queue of verdicts, its sender thread and its spool (spool.py)
    sink.py      ``MqttSink``: the sink interface (runtime/sinks) on top of them, and the trigger input
"""
