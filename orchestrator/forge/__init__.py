"""The forge bridge (`orchestrator forge`): webhooks and catch-up from GitHub,
Forgejo/Gitea and GitLab into job requests, and results into commit statuses.

Rule: imports `core`, never the host daemon (`host`): the two services share only the
wire contracts and the broker.
"""
