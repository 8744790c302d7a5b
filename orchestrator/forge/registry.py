"""Builds the `Forge` of each configured forge from its kind (one module per forge)."""

from __future__ import annotations

from orchestrator.forge.base import Forge, ForgeKind


def build_forge(kind: ForgeKind, *, api_url: str, token: str) -> Forge:
    if kind is ForgeKind.GITHUB:
        from orchestrator.forge.github import GitHubForge

        return GitHubForge(api_url, token)
    if kind is ForgeKind.FORGEJO:
        from orchestrator.forge.forgejo import ForgejoForge

        return ForgejoForge(api_url, token)
    from orchestrator.forge.gitlab import GitLabForge

    return GitLabForge(api_url, token)
