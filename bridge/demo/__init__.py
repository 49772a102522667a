"""The demo: a simulated plant (Modbus, and optionally OPC-UA) bridged by a real daemon.

``run`` starts the simulators and the runtime with the packaged ``demo.yaml``; ``simulator``
is the Modbus plant; ``opcua_plant`` is the OPC-UA server the demo and the tests use, and
``asyncua_server_adapter`` the one module that touches the asyncua server's internals.

May import everything in ``bridge`` but the CLI. Never a protocol connector.
"""
