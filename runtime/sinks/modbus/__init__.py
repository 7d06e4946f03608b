"""The ``modbus`` output: a Modbus TCP server for PLCs that speak only Modbus (register map: registers.py)."""
