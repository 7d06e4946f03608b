"""Sparkplug B 3.0: the line as an edge node, each camera a device (node.py), over Sparkplug's protobuf payloads
(sparkplug_b.proto, written from the specification's payload definition, compiled to sparkplug_b_pb2.py by ``make proto``; payloads.py)."""
