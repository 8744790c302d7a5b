"""`orchestrator config check`: validate the image map and settings, print what they resolve to."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator

from hypervisors.base import BackendName
from orchestrator.cli.common import (
    CLIError,
    Commands,
    OneLineParser,
    add_command,
    load_cli_image_map,
    load_cli_settings,
)
from orchestrator.core import reference
from orchestrator.core.config import DaemonSettings
from orchestrator.core.imagemap import ImageEntry, ImageMap


def register(commands: Commands) -> None:
    config = commands.add_parser("config", help="inspect configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, parser_class=OneLineParser)
    add_command(
        config_commands,
        "check",
        cmd_config_check,
        help="validate the image map and settings and print what they resolve to",
    )


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    image_map = load_cli_image_map(settings)
    problems = image_map.path_problems(image_dir=settings.images_dir, default_backend=settings.backend)
    problems += image_map.backend_problems(default_backend=settings.backend)
    if problems:
        raise CLIError("\n".join(problems))
    print(f"image map {settings.config}: OK")
    print(f"image dir: {settings.images_dir}")
    print(f"default label: {image_map.default_label} -> {image_map.resolve(None)}")
    for alias in sorted(image_map.aliases):
        print(f"alias {alias} -> {image_map.resolve(alias)}")
    for name, preset in sorted(image_map.sizes.items()):
        print(
            f"size {name}: {preset.cpus} CPU, {preset.memory_mb} MiB"
            + (f", {preset.disk_gb} GiB" if preset.disk_gb else "")
        )
    for label in sorted(image_map.images):
        print(f"label {label}")
        for name, value in describe_label(image_map, label, settings):
            print(f"  {name + ':':<14} {value}")
    environ = {**os.environ, "AMQP_URL": settings.masked_amqp_url()} if os.environ.get("AMQP_URL") else os.environ
    for item in reference.describe(
        environ,
        prefix=settings.amqp_prefix,
        exchange=settings.amqp_exchange,
        queue=settings.amqp_queue,
        routing_key=settings.amqp_routing_key,
        prefetch=settings.amqp_prefetch,
    ):
        print(f"reference setting {item.variable}={item.value}: {item.became}")
    shown = settings.model_dump(mode="json")
    shown["amqp_url"] = settings.masked_amqp_url()
    if shown.get("http_token"):
        shown["http_token"] = "****"
    print("settings: " + json.dumps(shown, sort_keys=True))
    return 0


def describe_label(image_map: ImageMap, label: str, settings: DaemonSettings) -> Iterator[tuple[str, str]]:
    """(name, value) lines: what a job on `label` gets on this host, and where each value
    comes from when the host's settings supply it."""
    from orchestrator.core.images import ImagePrepError, PrepState, check_image, describe_installed, resolve_image_path

    image = image_map.images[label]
    backend = image.backend or settings.backend
    yield "backend", backend.value + ("" if image.backend else " (host ORCH_BACKEND)")
    if backend is BackendName.NOOP:
        yield "image", f"{image.local_path} (not read: the noop backend simulates its VMs)"
    else:
        try:
            resolved = resolve_image_path(image, image_dir=settings.images_dir)
            yield "image", str(resolved) + (f" (local_path {image.local_path})" if resolved != image.local_path else "")
        except ImagePrepError:
            yield "image", str(image.local_path)  # outside IMAGE_DIR: the state says so
        state = check_image(image, image_dir=settings.images_dir)
        yield "state", str(state)
        if state.state is PrepState.MISSING:
            yield "source", image.source or "none"
        else:
            yield "installed", describe_installed(image, image_dir=settings.images_dir)
    if image.kernel is not None:
        yield "kernel", str(image.kernel)
    if image.initrd is not None:
        yield "initrd", str(image.initrd)
    if image.cmdline is not None:
        yield "cmdline", image.cmdline
    res = image_map.default_resources(label)
    yield (
        "resources",
        (
            f"{res.cpus} CPU, {res.memory_mb} MiB"
            + (f", {res.disk_gb} GiB disk" if res.disk_gb else "")
            + (f" (size {image.size})" if image.size else "")
        ),
    )
    caps = [f"{key} {value}" for key in ("max_cpus", "max_memory_mb", "max_disk_gb") if (value := getattr(image, key))]
    yield "caps", ", ".join(caps) or "none"
    yield "timeout", _job_timeout(image, settings)
    yield (
        "boot timeout",
        (
            f"{image.boot_timeout_s} s (boot_timeout_s)"
            if image.boot_timeout_s
            else f"{settings.boot_timeout_s:g} s (host BOOT_TIMEOUT_S)"
        ),
    )
    warm = image.warm
    yield (
        "warm pool",
        (
            f"{warm.ready} ready, replaced after {warm.max_age_s} s, snapshot {'yes' if warm.snapshot else 'no'}"
            if warm
            else "none"
        ),
    )
    keys = image_map.routing_keys(label)
    yield (
        "routing keys",
        ", ".join(repr(k) for k in keys) + (" ('' is a request without runs_on)" if "" in keys else ""),
    )


def _job_timeout(image: ImageEntry, settings: DaemonSettings) -> str:
    """A job's timeout when its request names none, and the most a request may ask for
    (as `runner.job_timeout_s` works them out)."""
    if image.timeout_s:
        default, source = image.timeout_s, "timeout_s"
    else:
        default, source = settings.default_timeout_s, "host DEFAULT_TIMEOUT_S"
    if image.max_timeout_s is None:
        return f"{default} s ({source}), max none (no max_timeout_s)"
    if default > image.max_timeout_s:
        return f"{image.max_timeout_s} s ({source} {default} s, cut to max_timeout_s), max {image.max_timeout_s} s (max_timeout_s)"
    return f"{default} s ({source}), max {image.max_timeout_s} s (max_timeout_s)"
