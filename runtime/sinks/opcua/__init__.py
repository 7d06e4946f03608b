"""The ``opcua`` output: an OPC UA server (asyncua) with each camera's results in OPC 40100-1 (Machine Vision)
terms, a ResultReady event per verdict and a Trigger method (server.py, address space: nodes.py)."""
