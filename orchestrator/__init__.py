"""CI VM orchestrator: consumes job requests from RabbitMQ and runs each in a fresh VM.

Its parts, top to bottom (docs/layout.md): `cli`, the services `host` (the daemon) and
`forge` (the bridge), `web` (the daemon's HTTP face), `core` (what they share); the VM
backends are the `hypervisors` package beside it.
"""

__version__ = "0.1.0"
