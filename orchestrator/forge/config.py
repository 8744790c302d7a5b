"""The bridge's configuration file (`orchestrator forge --config forge.yaml`).

```yaml
listen: 127.0.0.1:9470                 # where forges deliver webhooks (/hooks/<forge>)
max_connections: 256                   # HTTP connections at once; beyond it closed at once
header_timeout_s: 10                   # to send a request's headers (idle keep-alive too)
state_dir: /var/lib/orchestrator-forge # the bridge's journal (SQLite)
forges:
  github:                              # /hooks/github; the key is the forge's name
    kind: github                       # github | forgejo | gitlab (default: the key)
    api_url: https://api.github.com
    token: {env: GITHUB_TOKEN}         # or {file: /etc/orchestrator/github-token}
    webhook_secret: {env: GITHUB_WEBHOOK_SECRET}
repositories:
  - repo: acme/widgets                 # owner/name, or owner/* for all of an owner's
    forge: github
    jobs_file: .orchestrator.yaml
    webhook_secret: {env: WIDGETS_SECRET}   # instead of the forge's
    secrets: {DEPLOY_KEY: {env: WIDGETS_DEPLOY_KEY}}   # into jobs' env (pushes, same-repo PRs)
    forks: false                       # run pull requests from forks (never with secrets)
    cancel_superseded: false           # a new head cancels the previous head's jobs
    fallback: {runs_on: ubuntu-22.04, script_path: ci/run.sh}   # when there is no jobs file
```

Tokens and secrets are never written in this file: each names an environment variable
or a file, read once at start (a missing one is an error naming it) and never logged.
Errors name the file, line and key, like the image map's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.core.messages import ENV_NAME_PATTERN, LABEL_PATTERN
from orchestrator.core.yamlfile import YamlDocument, YamlError, parse_yaml
from orchestrator.forge.base import ForgeKind

CONFIG_MAX_BYTES = 1024 * 1024
NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"
REPO_PATTERN = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/([A-Za-z0-9_.-]+|\*)$"
MAX_SECRET_BYTES = 32 * 1024


class ForgeConfigError(Exception):
    """The bridge's configuration is unusable; the message names file, line and key."""


class SecretSource(BaseModel):
    """Where a token or secret comes from: an environment variable or a file."""

    model_config = ConfigDict(extra="forbid")

    env: Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)] | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env and file")
        return self

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"file {self.file}"

    def read(self, environ: os._Environ[str] | dict[str, str]) -> SecretStr:
        if self.env is not None:
            value = environ.get(self.env, "")
        else:
            assert self.file is not None
            try:
                value = self.file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read {self.describe()}: {getattr(exc, 'strerror', None) or exc}") from None
        if not value:
            raise ValueError(f"{self.describe()} is empty or not set")
        if len(value.encode()) > MAX_SECRET_BYTES:
            raise ValueError(f"{self.describe()} is over {MAX_SECRET_BYTES} bytes")
        return SecretStr(value)


class ForgeEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: ForgeKind | None = None
    api_url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+(/\S*)?$")]
    token: SecretSource
    webhook_secret: SecretSource | None = None
    catchup_interval_s: Annotated[float, Field(ge=10)] = 300.0


class Fallback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runs_on: Annotated[str, StringConstraints(pattern=LABEL_PATTERN)] | None = None
    script_path: Annotated[str, StringConstraints(min_length=1, max_length=512)]


class RepositoryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: Annotated[str, StringConstraints(pattern=REPO_PATTERN)]
    forge: Annotated[str, StringConstraints(pattern=NAME)]
    jobs_file: Annotated[str, StringConstraints(min_length=1, max_length=512)] = ".orchestrator.yaml"
    webhook_secret: SecretSource | None = None
    secrets: dict[Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)], SecretSource] = Field(
        default_factory=dict
    )
    forks: bool = False
    cancel_superseded: bool = False
    fallback: Fallback | None = None

    def matches(self, full_name: str) -> bool:
        owner, _, _ = self.repo.rpartition("/")
        if self.repo.endswith("/*"):
            return full_name.rpartition("/")[0] == owner
        return full_name == self.repo

    @property
    def is_pattern(self) -> bool:
        return self.repo.endswith("/*")


class ForgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: Annotated[str, StringConstraints(pattern=r"^[^\s:]+:\d{1,5}$")] = "127.0.0.1:9470"
    state_dir: Path = Path("/var/lib/orchestrator-forge")
    max_body_bytes: Annotated[int, Field(ge=1024, le=100 * 1024 * 1024)] = 25 * 1024 * 1024
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 256  # open HTTP connections at once
    header_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0  # to send a request's headers, and idle
    catchup_max_requests: Annotated[int, Field(ge=2, le=10_000)] = 50  # API calls per repository and pass
    catchup_max_commits: Annotated[int, Field(ge=1, le=10_000)] = 20  # commits run per repository and pass
    forges: dict[Annotated[str, StringConstraints(pattern=NAME)], ForgeEntry] = Field(min_length=1)
    repositories: list[RepositoryEntry] = Field(min_length=1)

    @field_validator("listen")
    @classmethod
    def _port_in_range(cls, value: str) -> str:
        if not 0 <= int(value.rpartition(":")[2]) <= 65535:
            raise ValueError("the port must be 0-65535")
        return value

    def kind_of(self, forge: str) -> ForgeKind:
        entry = self.forges[forge]
        return entry.kind or ForgeKind(forge)

    def repository(self, forge: str, full_name: str) -> RepositoryEntry | None:
        """The entry for a repository: an exact `owner/name` wins over `owner/*`."""
        found = [r for r in self.repositories if r.forge == forge and r.matches(full_name)]
        found.sort(key=lambda r: r.is_pattern)
        return found[0] if found else None


class LoadedForgeConfig(BaseModel):
    """The file's settings with every token and secret read."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: ForgeConfig
    tokens: dict[str, SecretStr]  # forge name -> API token
    forge_secrets: dict[str, SecretStr]  # forge name -> webhook secret
    repo_secrets: dict[int, SecretStr]  # index in repositories -> webhook secret
    job_secrets: dict[int, dict[str, SecretStr]]  # index in repositories -> env name -> value

    def webhook_secrets(self, forge: str, repo: RepositoryEntry) -> list[str]:
        index = self.config.repositories.index(repo)
        chosen = self.repo_secrets.get(index) or self.forge_secrets.get(forge)
        return [chosen.get_secret_value()] if chosen is not None else []

    def secrets_for(self, repo: RepositoryEntry) -> dict[str, str]:
        return {
            k: v.get_secret_value() for k, v in self.job_secrets.get(self.config.repositories.index(repo), {}).items()
        }


def _where(document: YamlDocument, path: tuple[Any, ...]) -> str:
    return f"{document.where(path)}: {'.'.join(str(p) for p in path) or '(top level)'}"


def _check(config: ForgeConfig, document: YamlDocument) -> list[str]:
    problems = []
    for name in config.forges:
        if config.forges[name].kind is None and name not in {k.value for k in ForgeKind}:
            problems.append(f"{_where(document, ('forges', name))}: name the forge's kind (github, forgejo or gitlab)")
    for index, repo in enumerate(config.repositories):
        if repo.forge not in config.forges:
            known = ", ".join(sorted(config.forges))
            problems.append(
                f"{_where(document, ('repositories', index, 'forge'))}: unknown forge {repo.forge!r} (forges: {known})"
            )
        elif repo.webhook_secret is None and config.forges[repo.forge].webhook_secret is None:
            problems.append(
                f"{_where(document, ('repositories', index))}: no webhook_secret here or on forge {repo.forge!r}"
            )
    return problems


def load_forge_config(path: Path, environ: dict[str, str] | None = None) -> LoadedForgeConfig:
    """Read, validate, and read every secret it names; `ForgeConfigError` otherwise."""
    env = dict(os.environ) if environ is None else environ
    try:
        with path.open("rb") as handle:
            text = handle.read(CONFIG_MAX_BYTES + 1)
    except OSError as exc:
        raise ForgeConfigError(f"{path}: cannot read the forge config: {exc.strerror or exc}") from None
    try:
        document = parse_yaml(text, filename=str(path), max_bytes=CONFIG_MAX_BYTES)
    except YamlError as exc:
        raise ForgeConfigError(str(exc)) from None
    if not isinstance(document.data, dict):
        raise ForgeConfigError(f"{path}:1: the forge config must be a mapping with `forges` and `repositories`")
    try:
        config = ForgeConfig.model_validate(document.data)
    except ValidationError as exc:
        raise ForgeConfigError(
            "\n".join(
                f"{_where(document, tuple(e['loc']))}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                for e in exc.errors()
            )
        ) from None
    problems = _check(config, document)
    secrets: dict[str, Any] = {"tokens": {}, "forge_secrets": {}, "repo_secrets": {}, "job_secrets": {}}

    def read(source: SecretSource, where: tuple[Any, ...]) -> SecretStr | None:
        try:
            return source.read(env)
        except ValueError as exc:
            problems.append(f"{_where(document, where)}: {exc}")
            return None

    for name, forge in config.forges.items():
        secrets["tokens"][name] = read(forge.token, ("forges", name, "token"))
        if forge.webhook_secret is not None:
            secrets["forge_secrets"][name] = read(forge.webhook_secret, ("forges", name, "webhook_secret"))
    for index, repo in enumerate(config.repositories):
        if repo.webhook_secret is not None:
            secrets["repo_secrets"][index] = read(repo.webhook_secret, ("repositories", index, "webhook_secret"))
        secrets["job_secrets"][index] = {
            key: read(source, ("repositories", index, "secrets", key)) for key, source in repo.secrets.items()
        }
    if problems:
        raise ForgeConfigError("\n".join(problems))
    return LoadedForgeConfig(config=config, **secrets)
