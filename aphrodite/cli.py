"""The `aphrodite` console script: `aphrodite run [MODEL] [options]` starts the server."""

from __future__ import annotations

import sys

USAGE = """usage: aphrodite run [MODEL] [options]
       aphrodite --version

Commands:
  run    start the OpenAI-compatible server (`aphrodite run --help` lists the options)
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from aphrodite import __version__

        print(f"aphrodite {__version__}")
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command in ("run", "serve"):
        from aphrodite.frontend.args import parse_args
        from aphrodite.server import run_server, setup_logging

        config, options = parse_args(rest, prog="aphrodite run", positional_model=True)
        setup_logging()
        sys.exit(run_server(config, options))
    print(f"aphrodite: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
