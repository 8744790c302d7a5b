"""The host daemon's HTTP face: the aiohttp app, the dashboard, log streaming, sessions.

Rule: sees the daemon only through `app.HostView` (a protocol the daemon implements);
imports `core` and nothing of `host`, `forge` or `cli`."""
