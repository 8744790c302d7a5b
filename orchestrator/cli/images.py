"""`orchestrator images prepare|list`: fetch base images ahead of jobs, and show what is on disk."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from orchestrator.cli.common import (
    CLIError,
    Commands,
    OneLineParser,
    add_command,
    load_cli_image_map,
    load_cli_settings,
)
from orchestrator.cli.progress import ProgressPrinter
from orchestrator.core.imagemap import RequestRejected


def register(commands: Commands) -> None:
    images = commands.add_parser("images", help="prepare and list base images")
    image_commands = images.add_subparsers(dest="images_command", required=True, parser_class=OneLineParser)
    prepare = add_command(
        image_commands,
        "prepare",
        cmd_images_prepare,
        help="download (and decompress, verify) images",
        description="Download missing images (all, or the labels given); --refresh re-checks the source and replaces an image only when it changed.",
    )
    prepare.add_argument(
        "labels", nargs="*", metavar="LABEL", help="labels or aliases (default: every image with a source)"
    )
    prepare.add_argument(
        "--refresh", action="store_true", help="check the source for a newer image (ETag / Last-Modified)"
    )
    prepare.add_argument("--state-dir", type=Path, help="env STATE_DIR (image_dir defaults to STATE_DIR/images)")
    prepare.add_argument("--image-dir", type=Path, help="where images may be written (env IMAGE_DIR)")
    add_command(
        image_commands,
        "list",
        cmd_images_list,
        help="each label's image file, size, format, sha256, source, fetch time",
    )


def cmd_images_prepare(args: argparse.Namespace) -> int:
    from orchestrator.core.images import ImagePreparer, ImagePrepError

    settings = load_cli_settings(args)
    image_map = load_cli_image_map(settings)
    try:
        labels = [image_map.resolve(label) for label in args.labels] or [
            label for label, image in image_map.images.items() if image.source is not None
        ]
    except RequestRejected as exc:
        raise CLIError(str(exc)) from None

    async def prepare_all() -> int:
        failures = 0
        progress = ProgressPrinter()

        def waiting(label: str, lock: Path) -> None:
            print(
                f"{label}: another process is preparing this image ({lock}); waiting for it",
                file=sys.stderr,
                flush=True,
            )

        preparer = ImagePreparer(
            image_map,
            image_dir=settings.images_dir,
            max_image_bytes=settings.max_image_bytes,
            on_progress=progress,
            on_wait=waiting,
        )
        try:
            for label in labels:
                try:
                    outcome = await preparer.prepare(label, refresh=args.refresh)
                    progress.done()
                    print(f"{label}: {outcome.value} ({image_map.images[label].local_path})")
                except ImagePrepError as exc:
                    progress.done()
                    print(f"error: {exc}", file=sys.stderr)
                    failures += 1
        finally:
            await preparer.close()
        return 1 if failures else 0

    return asyncio.run(prepare_all())


def cmd_images_list(args: argparse.Namespace) -> int:
    from orchestrator.core.images import describe_image

    settings = load_cli_settings(args)
    image_map = load_cli_image_map(settings)
    for label, image in sorted(image_map.images.items()):
        print(describe_image(label, image, image_dir=settings.images_dir))
    return 0
