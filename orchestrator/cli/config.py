"""`orchestrator config check`: validate the image map and settings, print what they resolve to."""

from __future__ import annotations

import argparse
import json

from orchestrator.cli.common import CLIError, Commands, OneLineParser, add_command, load_cli_image_map, load_cli_settings


def register(commands: Commands) -> None:
    config = commands.add_parser("config", help="inspect configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, parser_class=OneLineParser)
    add_command(config_commands, "check", cmd_config_check, help="validate the image map and settings and print what they resolve to")


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    image_map = load_cli_image_map(settings)
    problems = image_map.path_problems(image_dir=settings.images_dir, default_backend=settings.backend)
    if problems:
        raise CLIError("\n".join(problems))
    print(f"image map {settings.config}: OK")
    print(f"default label: {image_map.default_label} -> {image_map.resolve(None)}")
    for alias in sorted(image_map.aliases):
        print(f"alias {alias} -> {image_map.resolve(alias)}")
    for name, preset in sorted(image_map.sizes.items()):
        print(f"size {name}: {preset.cpus} CPU, {preset.memory_mb} MiB" + (f", {preset.disk_gb} GiB" if preset.disk_gb else ""))
    for label, image in sorted(image_map.images.items()):
        res = image_map.default_resources(label)
        keys = ", ".join(repr(k) for k in image_map.routing_keys(label))
        print(
            f"label {label}: backend {(image.backend or settings.backend).value}, {res.cpus} CPU, {res.memory_mb} MiB"
            + (f", {res.disk_gb} GiB disk" if res.disk_gb else "")
            + f", image {image.local_path}, routing keys {keys}"
        )
    shown = settings.model_dump(mode="json")
    shown["amqp_url"] = settings.masked_amqp_url()
    if shown.get("http_token"):
        shown["http_token"] = "****"
    print("settings: " + json.dumps(shown, sort_keys=True))
    return 0
