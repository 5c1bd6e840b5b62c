"""``onceflow templates generate [--check] [--dir DIR]``: the Flex Template specs.

Writes ``templates/<pipeline>/metadata.json`` for every pipeline in
:data:`onceflow.flex_templates.PIPELINES` and pins ``ARG BEAM_VERSION`` in
``templates/Dockerfile`` to the project's Beam version. ``--check`` writes
nothing and exits 1 with one line naming the first stale file.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from onceflow import flex_templates
from onceflow.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:  # pylint: disable=protected-access
    templates = subparsers.add_parser(
        "templates", help="Dataflow Flex Template specs generated from the pipeline flags",
        description="Dataflow Flex Template specs generated from the pipelines' PipelineOptions classes.")
    actions = templates.add_subparsers(dest="templates_command", metavar="ACTION")
    generate = actions.add_parser(
        "generate", help="write templates/<pipeline>/metadata.json and pin the Dockerfile's Beam version",
        description="Write templates/<pipeline>/metadata.json for every pipeline and set the default of "
                    "ARG BEAM_VERSION in templates/Dockerfile to onceflow/versions.py's BEAM_VERSION.")
    generate.add_argument("--check", action="store_true",
                          help="write nothing; exit 1 naming the first file that differs from what "
                               "would be generated")
    generate.add_argument("--dir", type=_folder, default=None,
                          help="the templates folder (default: templates/ of the source tree, else ./templates)")
    generate.set_defaults(handler=_generate)
    templates.set_defaults(handler=lambda _args: _usage(templates))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _folder(text: str) -> pathlib.Path:
    """A --dir value; an empty one is refused (as a path it would mean the current folder)."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty; give the templates folder, e.g. --dir=templates")
    return pathlib.Path(text)


def _generate(args: argparse.Namespace) -> int:
    """Writes (or with --check compares) the generated files. UsageError, one line
    naming the path, when the folder has no usable Dockerfile or a file cannot be
    read or written."""
    folder = (args.dir or flex_templates.default_templates_dir()).resolve()
    dockerfile = folder / flex_templates.DOCKERFILE
    if args.dir is None and not dockerfile.exists():
        raise UsageError(f"{dockerfile} not found (no templates/ in the source tree or the current folder); "
                         "pass --dir=PATH, the templates folder that holds the Dockerfile")
    if args.dir is not None and not folder.is_dir():
        raise UsageError(f"--dir: {folder} is not a folder; give the templates folder that holds the Dockerfile")
    if args.dir is not None and not dockerfile.exists():
        raise UsageError(f"--dir: {dockerfile} not found; --dir must be the templates folder that holds the "
                         "Dockerfile")
    try:
        if args.check:
            return _check(folder)
        return _write(folder)
    except flex_templates.DockerfileError as error:
        raise UsageError(str(error)) from None
    except OSError as error:  # a generated file's place cannot be read or written
        raise UsageError(f"cannot read or write {error.filename}: {error.strerror or error}") from None


def _check(folder: pathlib.Path) -> int:
    stale = flex_templates.stale(folder)
    if stale:
        print(f"onceflow templates: {_shown(folder / stale[0])} is stale; run `onceflow templates generate`",
              file=sys.stderr)
        return 1
    return 0


def _write(folder: pathlib.Path) -> int:
    for pipeline in flex_templates.PIPELINES:
        for name in flex_templates.generic_flags(pipeline):
            print(f"onceflow templates: note: --{name} ({pipeline.name}) has no entry in "
                  "onceflow.flex_templates.RULES; it gets a generic regex", file=sys.stderr)
    changed = flex_templates.write(folder)
    for relative in changed:
        print(f"wrote {_shown(folder / relative)}")
    if not changed:
        print(f"{_shown(folder)}: up to date")
    return 0


def _shown(path: pathlib.Path) -> str:
    try:
        return str(path.relative_to(pathlib.Path.cwd()))
    except ValueError:
        return str(path)
