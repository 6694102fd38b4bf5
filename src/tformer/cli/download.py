"""Download a public parallel corpus (at present: Multi30k task 1 raw text) into a directory.

Multi30k (Elliott et al., 2016, https://github.com/multi30k/dataset) may be used for research and
education only, not commercially; cite Elliott et al. 2016 when you publish results on it. tformer
ships none of it: this command fetches it from its authors' repository (or the --base-url mirror)."""

from __future__ import annotations

import argparse
import sys

from tformer.cli.argument_types import path_text
from tformer.multi30k import MULTI30K_BASE_URL, MULTI30K_LANGUAGES, MULTI30K_SHA256

HELP = "download a public parallel corpus (multi30k)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=["multi30k"], help="which corpus to fetch")
    parser.add_argument(
        "--out", type=path_text, required=True, help="directory to write train.L, val.L, test2016.L into"
    )
    parser.add_argument(
        "--base-url",
        default=MULTI30K_BASE_URL,
        help="mirror URL, the directory holding the .gz files (http(s):// or file://; a query string stays after "
        "each file name; default: the multi30k/dataset repository on GitHub)",
    )
    parser.add_argument(
        "--languages",
        default=",".join(MULTI30K_LANGUAGES),
        help=f"comma-separated languages (default: {','.join(MULTI30K_LANGUAGES)})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the known content")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: 60)")


def run(args: argparse.Namespace) -> int:
    from tformer.data.download import download_multi30k

    languages = [language.strip() for language in args.languages.split(",") if language.strip()]
    written = download_multi30k(
        args.out,
        base_url=args.base_url,
        languages=languages,
        overwrite=args.overwrite,
        checksums=None if args.no_verify else MULTI30K_SHA256,
        timeout=args.timeout,
        progress=lambda message: print(message, file=sys.stderr),
    )
    for path in written:
        print(path)
    return 0
