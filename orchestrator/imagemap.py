"""The operator's YAML image map: labels, aliases, size presets and per-image settings.

`load_image_map` refuses a bad file at load with `file:line: key.path: what is wrong`, so
an operator's typo never reaches a job. `ImageMap` answers the questions a job asks:
which canonical label does `runs_on` mean, which routing keys lead to a label's queue,
and which resources a request gets.
"""

from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from hypervisors.base import BackendName, ImageFormat
from orchestrator.messages import LABEL_PATTERN, JobRequest

DEFAULT_IMAGE_MAP = Path("examples/orchestrator-image-map.yaml")
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

    cpus: Annotated[int, Field(ge=1, le=512)]
    memory_mb: Annotated[int, Field(ge=64, le=4 * 1024 * 1024)]
    disk_gb: Annotated[int, Field(ge=1, le=64 * 1024)] | None = None


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
    cpus: Annotated[int, Field(ge=1, le=512)] | None = None
    memory_mb: Annotated[int, Field(ge=64, le=4 * 1024 * 1024)] | None = None
    disk_gb: Annotated[int, Field(ge=1, le=64 * 1024)] | None = None
    max_cpus: Annotated[int, Field(ge=1, le=512)] | None = None
    max_memory_mb: Annotated[int, Field(ge=64, le=4 * 1024 * 1024)] | None = None
    max_disk_gb: Annotated[int, Field(ge=1, le=64 * 1024)] | None = None
    timeout_s: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] | None = None
    max_timeout_s: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] | None = None
    boot_timeout_s: Annotated[int, Field(ge=1, le=24 * 3600)] | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: Annotated[str, StringConstraints(max_length=4096)] | None = None


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

    # --- label resolution ----------------------------------------------------------------
    def resolve(self, label: str | None) -> str:
        """The canonical label (an `images` key) for `runs_on`; None means the default."""
        current = label or self.default_label
        seen: list[str] = []
        while current not in self.images:
            if current in seen or current not in self.aliases:
                known = ", ".join(self.known_labels())
                raise RequestRejected(f"runs_on: unknown label {label!r}; this fleet knows: {known}")
            seen.append(current)
            current = self.aliases[current]
        return current

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
        for field_name, cap in (
            ("cpus", image.max_cpus),
            ("memory_mb", image.max_memory_mb),
            ("disk_gb", image.max_disk_gb),
        ):
            wanted = getattr(resources, field_name)
            if cap is not None and wanted is not None and wanted > cap:
                raise RequestRejected(
                    f"{field_name}: {wanted} is above image {canonical!r}'s cap of {cap}; ask for less or a smaller size"
                )
        return resources


# --- loading -------------------------------------------------------------------------------


def _line_index(node: yaml.Node, path: tuple[Any, ...], index: dict[tuple[Any, ...], int]) -> None:
    index.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            index[path + (key,)] = key_node.start_mark.line + 1
            _line_index(value_node, path + (key,), index)
            index[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, path + (i,), index)


def _line_for(path: tuple[Any, ...], index: dict[tuple[Any, ...], int]) -> int:
    for cut in range(len(path), -1, -1):
        if path[:cut] in index:
            return index[path[:cut]]
    return 1


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _describe(error: dict[str, Any]) -> str:
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
    return []


def _reference_problems(image_map: ImageMap, base_dir: Path) -> list[tuple[tuple[Any, ...], str]]:
    problems: list[tuple[tuple[Any, ...], str]] = []
    for alias, target in image_map.aliases.items():
        if alias in image_map.images:
            problems.append((("aliases", alias), "an alias must not have the name of an image label"))
        chain = [alias]
        current = target
        while current not in image_map.images:
            if current in chain:
                cycle = " -> ".join(chain + [current])
                problems.append((("aliases", alias), f"alias cycle: {cycle}"))
                break
            if current not in image_map.aliases:
                problems.append(
                    (("aliases", alias), f"{current!r} is neither an image label nor an alias")
                )
                break
            chain.append(current)
            current = image_map.aliases[current]
    if not problems:
        try:
            image_map.resolve(None)
        except RequestRejected:
            problems.append(
                (("default_label",), f"{image_map.default_label!r} is neither an image label nor an alias")
            )
    for label, image in image_map.images.items():
        where = ("images", label)
        if image.size is not None and image.size not in image_map.sizes:
            problems.append((where + ("size",), f"unknown size preset {image.size!r}; define it under sizes"))
        if image.initrd is not None and image.kernel is None:
            problems.append((where + ("initrd",), "initrd needs kernel"))
        if image.cmdline is not None and image.kernel is None:
            problems.append((where + ("cmdline",), "cmdline needs kernel"))
        for key in ("local_path", "kernel", "initrd"):
            path = getattr(image, key)
            if path is not None and not path.is_absolute():
                setattr(image, key, (base_dir / path).resolve())
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
        if image.size is not None and image.size not in image_map.sizes:
            continue  # reported above; the defaults cannot be worked out
        defaults = image_map.default_resources(label)
        for cap, wanted in (("max_cpus", "cpus"), ("max_memory_mb", "memory_mb"), ("max_disk_gb", "disk_gb")):
            limit, value = getattr(image, cap), getattr(defaults, wanted)
            if limit is not None and value is not None and value > limit:
                problems.append((where + (wanted,), f"default {wanted} {value} is above {cap} {limit}"))
    return problems


def parse_image_map(text: str, *, filename: str, base_dir: Path) -> ImageMap:
    """Validate image-map YAML; raise `ImageMapError` listing every problem with its line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise ImageMapError(f"{filename}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or node is None:
        raise ImageMapError(f"{filename}:1: the image map must be a YAML mapping with an `images` key")
    index: dict[tuple[Any, ...], int] = {}
    _line_index(node, (), index)
    try:
        image_map = ImageMap.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{filename}:{_line_for(tuple(e['loc']), index)}: {_dotted(tuple(e['loc']))}: {_describe(e)}"
            for e in exc.errors()
        ]
        raise ImageMapError("\n".join(lines)) from None
    problems = _reference_problems(image_map, base_dir)
    if problems:
        raise ImageMapError(
            "\n".join(f"{filename}:{_line_for(path, index)}: {_dotted(path)}: {msg}" for path, msg in problems)
        )
    return image_map


def load_image_map(path: Path) -> ImageMap:
    """Read and validate the image map at `path` (relative paths inside resolve against
    the file's directory)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ImageMapError(f"{path}: cannot read the image map: {exc.strerror or exc}") from None
    return parse_image_map(text, filename=str(path), base_dir=path.resolve().parent)


