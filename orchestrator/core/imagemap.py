"""The operator's YAML image map: labels, aliases, size presets and per-image settings.

`load_image_map` refuses a bad file at load with `file:line: key.path: what is wrong`, so
an operator's typo never reaches a job. `ImageMap` answers the questions a job asks:
which canonical label does `runs_on` mean, which routing keys lead to a label's queue,
and which resources a request gets.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError

from hypervisors.base import BackendName, DirectBoot, ImageFormat
from orchestrator.core.messages import LABEL_PATTERN, Cpus, DiskGb, JobRequest, MemoryMb, TimeoutS
from orchestrator.core.yamlfile import YamlDocument, YamlError, parse_yaml

DEFAULT_IMAGE_MAP = Path("examples/orchestrator-image-map.yaml")
MAP_MAX_BYTES = 1024 * 1024
LabelName = Annotated[str, StringConstraints(pattern=LABEL_PATTERN)]


class Decompress(str, enum.Enum):
    ZSTD = "zstd"
    NONE = "none"


class ImageMapError(Exception):
    """The image map is unusable; the message names file, line and key."""


class RequestRejected(Exception):
    """A well-formed request this host's image map cannot honour (field and fix in the text)."""


class SizePreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpus: Cpus
    memory_mb: MemoryMb
    disk_gb: DiskGb | None = None


class WarmPool(BaseModel):
    """`warm:` under an image: keep `ready` booted VMs of it waiting for jobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ready: Annotated[int, Field(ge=1, le=256)]
    # Replaced when older than this (a long-idle guest drifts: caches, leases, clock).
    max_age_s: Annotated[int, Field(ge=60, le=7 * 24 * 3600)] = 3600
    snapshot: bool = False


class ImageEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: BackendName | None = None
    source: Annotated[str, StringConstraints(pattern=r"^(https?|file)://\S+$")] | None = None
    local_path: Path
    format: ImageFormat | None = None
    decompress: Decompress = Decompress.NONE
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    nocloud: bool = True
    checkout: bool = True
    size: LabelName | None = None
    cpus: Cpus | None = None
    memory_mb: MemoryMb | None = None
    disk_gb: DiskGb | None = None
    max_cpus: Cpus | None = None
    max_memory_mb: MemoryMb | None = None
    max_disk_gb: DiskGb | None = None
    timeout_s: TimeoutS | None = None
    max_timeout_s: TimeoutS | None = None
    boot_timeout_s: Annotated[int, Field(ge=1, le=24 * 3600)] | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: Annotated[str, StringConstraints(max_length=4096)] | None = None
    warm: WarmPool | None = None

    def direct_boot(self) -> DirectBoot | None:
        """The kernel to boot directly, when the entry names one."""
        return DirectBoot(kernel=self.kernel, initrd=self.initrd, cmdline=self.cmdline) if self.kernel else None

    def without_warm(self) -> ImageEntry:
        """The entry as a VM sees it: a pool VM is stale when this changes, not when only
        the pool's own settings do."""
        return self.model_copy(update={"warm": None})


@dataclass(frozen=True)
class Resources:
    cpus: int
    memory_mb: int
    disk_gb: int | None


FALLBACK_RESOURCES = Resources(cpus=1, memory_mb=1024, disk_gb=None)


class ImageMap(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_label: LabelName
    aliases: dict[LabelName, LabelName] = Field(default_factory=dict)
    sizes: dict[LabelName, SizePreset] = Field(default_factory=dict)
    images: dict[LabelName, ImageEntry] = Field(min_length=1)
    # Where each key came from, so checks made after loading still cite file:line.
    _source: YamlDocument | None = PrivateAttr(default=None)

    def where(self, path: tuple[Any, ...]) -> str:
        return self._source.where(path) if self._source is not None else "image map"

    # --- files ---------------------------------------------------------------------------
    def path_problems(self, *, image_dir: Path, default_backend: BackendName) -> list[str]:
        """Every file an image names (`local_path`, `kernel`, `initrd`), resolved through
        any symlink, must lie inside `image_dir`: the map's author decides which files a
        VM boots from, not a link someone placed. Images of the simulated `noop` backend
        read no file and are not checked."""
        root = image_dir.resolve()
        problems = []
        for label, image in sorted(self.images.items()):
            if (image.backend or default_backend) is BackendName.NOOP:
                continue
            for key in ("local_path", "kernel", "initrd"):
                path = getattr(image, key)
                if path is None:
                    continue
                resolved = path.resolve()
                if not resolved.is_relative_to(root):
                    via = f" (through a symlink, to {resolved})" if resolved != path else ""
                    problems.append(
                        f"{self.where(('images', label, key))}: images.{label}.{key}: {path}{via} is outside "
                        f"IMAGE_DIR {image_dir} (move the file there, or set IMAGE_DIR to the directory that holds it)"
                    )
        return problems

    def backend_problems(self, *, default_backend: BackendName) -> list[str]:
        """What an image asks of a backend that backend cannot do (known only once the
        host's default backend is)."""
        return [
            f"{self.where(('images', label, 'warm'))}: images.{label}.warm: the {BackendName.ZONES.value} backend "
            "has no warm pools (remove warm, or give the image the libvirt backend)"
            for label, image in sorted(self.images.items())
            if image.warm is not None and (image.backend or default_backend) is BackendName.ZONES
        ]

    # --- label resolution ----------------------------------------------------------------
    def resolve(self, label: str | None) -> str:
        """The canonical label (an `images` key) for `runs_on`; None means the default."""
        canonical, _ = self.follow_aliases(label or self.default_label)
        if canonical is None:
            raise RequestRejected(
                f"runs_on: unknown label {label!r}; this fleet knows: {', '.join(self.known_labels())}"
            )
        return canonical

    def follow_aliases(self, name: str) -> tuple[str | None, str | None]:
        """The image label `name` leads to through the alias chain, or None and why not."""
        chain: list[str] = []
        current = name
        while current not in self.images:
            if current in chain:
                return None, "alias cycle: " + " -> ".join(chain + [current])
            if current not in self.aliases:
                return None, f"{current!r} is neither an image label nor an alias"
            chain.append(current)
            current = self.aliases[current]
        return current, None

    def known_labels(self) -> list[str]:
        return sorted(set(self.images) | set(self.aliases))

    def routing_keys(self, canonical: str) -> list[str]:
        """Every routing key whose messages belong in `canonical`'s queue.

        The empty key stands for "no runs_on": it leads to the default label's queue."""
        keys = [canonical] + sorted(a for a in self.aliases if self.resolve(a) == canonical)
        if self.resolve(None) == canonical:
            keys.append("")
        return keys

    # --- resources -------------------------------------------------------------------------
    def default_resources(self, canonical: str) -> Resources:
        image = self.images[canonical]
        base = FALLBACK_RESOURCES
        if image.size is not None:
            preset = self.sizes[image.size]
            base = Resources(preset.cpus, preset.memory_mb, preset.disk_gb)
        return Resources(
            cpus=image.cpus or base.cpus,
            memory_mb=image.memory_mb or base.memory_mb,
            disk_gb=image.disk_gb or base.disk_gb,
        )

    def resources_for(self, canonical: str, request: JobRequest) -> Resources:
        """Image defaults, then the request's size preset, then its explicit values; each
        checked against the image's caps."""
        image = self.images[canonical]
        resources = self.default_resources(canonical)
        if request.size is not None:
            preset = self.sizes.get(request.size)
            if preset is None:
                known = ", ".join(sorted(self.sizes)) or "none are defined"
                raise RequestRejected(f"size: unknown size preset {request.size!r}; presets: {known}")
            resources = Resources(preset.cpus, preset.memory_mb, preset.disk_gb or resources.disk_gb)
        resources = Resources(
            cpus=request.cpus or resources.cpus,
            memory_mb=request.memory_mb or resources.memory_mb,
            disk_gb=request.disk_gb or resources.disk_gb,
        )
        for field_name, _ in self.cap_problems(canonical, resources):
            wanted, cap = getattr(resources, field_name), getattr(image, f"max_{field_name}")
            raise RequestRejected(
                f"{field_name}: {wanted} is above image {canonical!r}'s cap of {cap}; ask for less or a smaller size"
            )
        return resources

    def cap_problems(self, canonical: str, resources: Resources) -> list[tuple[str, str]]:
        """Each resource above the image's cap, as (field, "<field> <value> is above max_<field> <cap>")."""
        image = self.images[canonical]
        problems = []
        for field_name in ("cpus", "memory_mb", "disk_gb"):
            wanted, cap = getattr(resources, field_name), getattr(image, f"max_{field_name}")
            if cap is not None and wanted is not None and wanted > cap:
                problems.append((field_name, f"{field_name} {wanted} is above max_{field_name} {cap}"))
        return problems


# --- loading -------------------------------------------------------------------------------


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _describe(error: Mapping[str, Any]) -> str:
    loc = error["loc"]
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        fix = f" (did you mean {hint[0]!r}?)" if hint else f" (allowed: {', '.join(allowed)})"
        return f"unknown key{fix}"
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "string_type" and isinstance(error.get("input"), (int, float)):
        return f"{error['msg']}: YAML read {error['input']!r} as a number; quote the value"
    return error["msg"]


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    if not parent:
        return sorted(ImageMap.model_fields)
    if parent[0] == "images" and len(parent) == 2:
        return sorted(ImageEntry.model_fields)
    if parent[0] == "sizes" and len(parent) == 2:
        return sorted(SizePreset.model_fields)
    if parent[0] == "images" and len(parent) == 3 and parent[2] == "warm":
        return sorted(WarmPool.model_fields)
    return []


def _with_absolute_paths(image_map: ImageMap, base_dir: Path) -> ImageMap:
    """Relative `local_path`, `kernel` and `initrd` resolved against the map's directory."""
    images = {}
    for label, image in image_map.images.items():
        update = {
            key: (base_dir / path).resolve()
            for key in ("local_path", "kernel", "initrd")
            if (path := getattr(image, key)) is not None and not path.is_absolute()
        }
        images[label] = image.model_copy(update=update) if update else image
    return image_map.model_copy(update={"images": images})


def _reference_problems(image_map: ImageMap) -> list[tuple[tuple[Any, ...], str]]:
    """What the schema cannot see: references between entries, files, default caps."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    for alias in image_map.aliases:
        if alias in image_map.images:
            problems.append((("aliases", alias), "an alias must not have the name of an image label"))
            continue
        _, problem = image_map.follow_aliases(alias)
        if problem is not None:
            problems.append((("aliases", alias), problem))
    if not problems and image_map.follow_aliases(image_map.default_label)[0] is None:
        problems.append((("default_label",), f"{image_map.default_label!r} is neither an image label nor an alias"))
    for label, image in image_map.images.items():
        where = ("images", label)
        if image.size is not None and image.size not in image_map.sizes:
            problems.append((where + ("size",), f"unknown size preset {image.size!r}; define it under sizes"))
        if image.initrd is not None and image.kernel is None:
            problems.append((where + ("initrd",), "initrd needs kernel"))
        if image.cmdline is not None and image.kernel is None:
            problems.append((where + ("cmdline",), "cmdline needs kernel"))
        for key in ("kernel", "initrd"):
            path = getattr(image, key)
            if path is not None and not path.is_file():
                problems.append((where + (key,), f"file {path} does not exist"))
        if image.source is None and image.backend is not BackendName.NOOP and not image.local_path.exists():
            problems.append(
                (where + ("local_path",), f"file {image.local_path} does not exist and no source is given to fetch it")
            )
        if image.decompress is Decompress.ZSTD and image.source is None:
            problems.append((where + ("decompress",), "decompress needs a source"))
        if image.warm is not None and not image.nocloud:
            problems.append(
                (
                    where + ("warm",),
                    "warm pools need nocloud: true (a pool VM gets its job through a waiter in its user-data)",
                )
            )

        if image.size is not None and image.size not in image_map.sizes:
            continue  # reported above; the defaults cannot be worked out
        for key, over in image_map.cap_problems(label, image_map.default_resources(label)):
            problems.append((where + (key,), f"default {over}"))
    return problems


def parse_image_map(text: str | bytes, *, filename: str, base_dir: Path, max_bytes: int = MAP_MAX_BYTES) -> ImageMap:
    """Validate image-map YAML; raise `ImageMapError` listing every problem with its line."""
    try:
        document = parse_yaml(text, filename=filename, max_bytes=max_bytes)
    except YamlError as exc:
        raise ImageMapError(str(exc)) from None
    if not isinstance(document.data, dict):
        raise ImageMapError(f"{filename}:1: the image map must be a YAML mapping with an `images` key")
    try:
        image_map = _with_absolute_paths(ImageMap.model_validate(document.data), base_dir)
    except ValidationError as exc:
        raise ImageMapError(
            "\n".join(
                f"{document.where(tuple(e['loc']))}: {_dotted(tuple(e['loc']))}: {_describe(e)}" for e in exc.errors()
            )
        ) from None
    problems = _reference_problems(image_map)
    if problems:
        raise ImageMapError("\n".join(f"{document.where(path)}: {_dotted(path)}: {msg}" for path, msg in problems))
    image_map._source = document
    return image_map


def load_image_map(path: Path, *, max_bytes: int = MAP_MAX_BYTES) -> ImageMap:
    """Read and validate the image map at `path` (relative paths inside resolve against
    the file's directory). A file above `max_bytes` is refused without reading it all."""
    try:
        with path.open("rb") as handle:
            text = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ImageMapError(f"{path}: cannot read the image map: {exc.strerror or exc}") from None
    return parse_image_map(text, filename=str(path), base_dir=path.resolve().parent, max_bytes=max_bytes)
