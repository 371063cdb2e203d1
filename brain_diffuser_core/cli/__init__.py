"""One module per CLI command; each exposes ``add_parser(subparsers)`` that sets ``func`` on its parser."""

#: command modules, in the order ``--help`` lists them
COMMANDS: tuple[str, ...] = ("prepare", "extract", "fit", "reconstruct", "evaluate", "world", "sweep", "download")
