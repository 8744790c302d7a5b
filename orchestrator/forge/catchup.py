"""Catch-up: a push made while the bridge was down still gets its jobs and its status.

Webhooks get lost (a restart of the bridge, a network blip; GitHub does not redeliver,
GitLab disables a failing hook, Forgejo does not retry), so the bridge converges on the
forge's state instead of trusting that every webhook arrives. A pass lists each
repository's branches and open pull/merge requests through the forge's API; a head that
differs from the one the journal last saw, and for which that commit has no run for that
ref yet, is handled as if its webhook had come (same jobs file, filters, fork and secret
rules; status `queued (caught up)`). A repository's first pass only records its heads:
a new installation does not run CI for every old branch. Repositories matched by a
pattern (`owner/*`) are caught up once a webhook from them has been seen.

A pass is bounded per repository: at most `max_requests` API calls and `max_commits`
commits run; what it skips is logged with a count. It runs on its own API clients, so
its budget and its retries never slow the webhook receiver.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.core.logsetup import EventLogger
from orchestrator.forge.base import BranchHead, EventKind, Forge, ForgeEvent, PullHead, Repo
from orchestrator.forge.config import LoadedForgeConfig, RepositoryEntry
from orchestrator.forge.dispatcher import Dispatcher
from orchestrator.forge.http import ForgeApiError
from orchestrator.forge.journal import BridgeJournal

log = EventLogger("orchestrator.forge.catchup")

DEFAULT_MAX_REQUESTS = 50
DEFAULT_MAX_COMMITS = 20
RETRIES = 3


@dataclass
class RepoReport:
    """What one pass found and did for one repository (printed by `forge catch-up`)."""

    forge: str
    repo: str
    heads: int = 0
    first_pass: bool = False
    ran: list[str] = field(default_factory=list)  # "<ref_key>@<sha>"
    skipped: int = 0
    error: str | None = None

    def line(self) -> str:
        if self.error:
            return f"{self.forge} {self.repo}: error: {self.error}"
        if self.first_pass:
            return f"{self.forge} {self.repo}: first pass, recorded {self.heads} head(s), ran nothing"
        text = f"{self.forge} {self.repo}: {self.heads} head(s), ran {len(self.ran)}"
        text += "".join(f"\n  {entry}" for entry in self.ran)
        return text + (f"\n  skipped {self.skipped} (over catchup_max_commits)" if self.skipped else "")


class CatchUp:
    def __init__(
        self,
        *,
        journal: BridgeJournal,
        forges: Mapping[str, Forge],
        config: LoadedForgeConfig,
        dispatcher: Dispatcher | None,
    ) -> None:
        self._journal = journal
        self._forges = forges  # the pass's own clients, not the receiver's
        self._config = config
        self._dispatcher = dispatcher  # None: a dry run
        self.caught_up: Counter[tuple[str, str]] = Counter()  # (forge, repo) -> commits run by catch-up
        self.hook_problems: dict[tuple[str, str], list[str]] = {}  # (forge, repo) -> our hooks a forge disabled
        self.last_pass: dict[tuple[str, str], float] = {}  # (forge, repo) -> when a pass last listed it

    async def repositories(self, forge: str) -> list[tuple[str, RepositoryEntry]]:
        """The repositories a pass covers: every exact name, and each repository a
        pattern matches once one of its webhooks has been seen."""
        chosen: dict[str, RepositoryEntry] = {}
        for repo in self._config.config.repositories:
            if repo.forge == forge and not repo.is_pattern:
                chosen[repo.repo] = repo
        for name in await self._journal.repositories_seen(forge):
            entry = self._config.config.repository(forge, name)
            if entry is not None and name not in chosen:
                chosen[name] = entry
        return sorted(chosen.items())

    async def pass_all(self, *, only: str | None = None) -> list[RepoReport]:
        reports = []
        for forge in sorted(self._forges):
            reports += await self.pass_forge(forge, only=only)
        return reports

    async def pass_forge(self, forge: str, *, only: str | None = None) -> list[RepoReport]:
        reports = []
        for name, entry in await self.repositories(forge):
            if only is None or name == only:
                reports.append(await self.pass_repo(forge, name, entry))
        return reports

    async def pass_repo(self, forge_name: str, full_name: str, entry: RepositoryEntry) -> RepoReport:
        report = RepoReport(forge_name, full_name)
        forge = self._forges[forge_name]
        rlog = log.bind(forge=forge_name, repo=full_name)
        api = forge.api
        calls_before = api.calls
        api.budget = self._config.config.catchup_max_requests
        try:
            repo = await self._repo(forge_name, full_name)
            branches = await _retrying(lambda: forge.branches(repo), rlog)
            pulls = await _retrying(lambda: forge.open_pulls(repo), rlog)
        except ForgeApiError as exc:
            report.error = str(exc)
            rlog.warning("catchup.failed", error=str(exc))
            return report
        finally:
            api.budget = None
        known = await self._journal.heads(forge_name, full_name)
        report.first_pass = not known and not await self._journal.repository_has_runs(forge_name, full_name)
        events = [_push(repo, head) for head in branches] + [_pull(repo, pull) for pull in pulls]
        report.heads = len(events)
        todo = []
        for event in events:
            if report.first_pass or known.get(event.ref_key) == event.commit_sha:
                continue
            if await self._journal.has_run(forge_name, full_name, event.ref_key, event.commit_sha):
                continue
            todo.append(event)
        limit = self._config.config.catchup_max_commits
        report.skipped = max(0, len(todo) - limit)
        for event in todo[:limit]:
            report.ran.append(f"{event.ref_key}@{event.commit_sha}")
            if self._dispatcher is not None:
                await self._dispatcher.submit(
                    forge_name, f"catch-up/{event.ref_key}/{event.commit_sha}", event, source="catch-up"
                )
                self.caught_up[(forge_name, full_name)] += 1
        if self._dispatcher is not None:
            # Heads skipped over the commit limit stay unrecorded: the next pass runs them.
            skipped = {(e.ref_key, e.commit_sha) for e in todo[limit:]}
            seen = {e.ref_key: e.commit_sha for e in events if (e.ref_key, e.commit_sha) not in skipped}
            await self._journal.record_heads(forge_name, full_name, repo, seen)
            self.last_pass[(forge_name, full_name)] = time.time()
        await self._check_hooks(forge_name, forge, repo, rlog)
        if report.skipped:
            rlog.warning("catchup.skipped", commits=report.skipped, limit=limit)
        rlog.info(
            "catchup.pass",
            heads=report.heads,
            ran=len(report.ran),
            first_pass=report.first_pass,
            api_calls=api.calls - calls_before,
        )
        return report

    async def _check_hooks(self, forge_name: str, forge: Forge, repo: Repo, rlog: EventLogger) -> None:
        """GitLab disables a project hook that keeps failing (for a while, or for good on
        4xx) and then sends nothing: say so while catch-up covers the gap. Forges whose
        API does not tell hook health (`hooks`) are not checked."""
        hooks = getattr(forge, "hooks", None)
        if hooks is None:
            return
        try:
            listed = await hooks(repo)
        except ForgeApiError as exc:
            rlog.warning("catchup.hooks_unreadable", error=str(exc))
            return
        ours = [h for h in listed if h.url.rstrip("/").endswith(f"/hooks/{forge_name}")]
        problems = [
            f"webhook {h.id} ({h.url}) is {h.alert_status.value}" for h in ours if h.alert_status.value != "executable"
        ]
        key = (forge_name, repo.full_name)
        if problems:
            self.hook_problems[key] = problems
            rlog.warning(
                "catchup.hook_disabled",
                problems=problems,
                fix="re-enable it in the project's Settings > Webhooks (Edit, then Save or Test)",
            )
        else:
            self.hook_problems.pop(key, None)

    async def _repo(self, forge: str, full_name: str) -> Repo:
        """The repository as its webhooks described it (clone URL, GitLab's project id),
        else as the forge's API describes it."""
        seen = await self._journal.repository(forge, full_name)
        if seen is not None and seen.clone_url:
            return seen
        return await _retrying(lambda: self._forges[forge].repository(full_name), log.bind(forge=forge, repo=full_name))


async def _retrying(call, rlog: EventLogger):  # type: ignore[no-untyped-def]
    """A listing, tried again when the forge says trying again can help."""
    for attempt in range(RETRIES):
        try:
            return await call()
        except ForgeApiError as exc:
            if exc.retry_after_s is None or attempt == RETRIES - 1:
                raise
            rlog.warning("catchup.retry", error=str(exc), retry_in_s=exc.retry_after_s)
            await asyncio.sleep(min(exc.retry_after_s, 60.0))
    raise AssertionError("unreachable")


def _push(repo: Repo, head: BranchHead) -> ForgeEvent:
    return ForgeEvent(
        kind=EventKind.PUSH,
        repo=repo,
        commit_sha=head.commit_sha,
        branch=head.name,
        delivery_id=f"catch-up/branch/{head.name}/{head.commit_sha}",
    )


def _pull(repo: Repo, pull: PullHead) -> ForgeEvent:
    return ForgeEvent(
        kind=EventKind.PULL_REQUEST,
        repo=repo,
        commit_sha=pull.commit_sha,
        branch=pull.base_branch,
        pull_number=pull.number,
        head_branch=pull.head_branch,
        head_clone_url=pull.head_clone_url,
        from_fork=pull.from_fork,
        delivery_id=f"catch-up/pull/{pull.number}/{pull.commit_sha}",
    )
