"""CI VM orchestrator: consumes job requests from RabbitMQ and runs each in a fresh VM."""

__version__ = "0.1.0"
