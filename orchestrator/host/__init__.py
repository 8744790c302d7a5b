"""The host daemon (`orchestrator run`): intake, consumers and the host's window, capacity,
the runner, warm pools, hand-back, reconciliation, the outbox and journal, control,
retention, console following, dead-letter answers and the reference ingress.

Rule: may use `web` (it serves the HTTP face) and `core`; never the bridge (`forge`)."""
