"""What the CLI, the host daemon, its HTTP face and the bridge share: the wire messages and
the broker topology, broker connections and the fleet view, settings, YAML loading, the
image map and image preparation, logging and metrics, HTTP serving within limits.

Rule: imports nothing from the parts above it (`host`, `web`, `forge`, `cli`)."""
