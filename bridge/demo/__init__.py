"""The demo: a simulated plant (Modbus, and optionally OPC-UA) bridged by a real daemon.

``run`` starts the simulators and the runtime with the packaged ``demo.yaml``; ``simulator``
is the Modbus plant; ``opcua_plant`` is the OPC-UA server the demo and the tests use.

May import everything in ``bridge`` but the CLI. Never a protocol connector.
"""
