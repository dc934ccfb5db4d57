"""Sub-commands of `fadelab`, one module per room: each module defines `register(subparsers)`.

fadelab/cli.py keeps the core commands (run, generate, organism) and calls `register` of every
module named in MODULES, so a room adds its commands by adding one file and one name here.
Command modules parse arguments and call library functions; library code never sees argparse.
"""

MODULES: tuple[str, ...] = ("edit", "finetune", "evaluate", "bench", "grid")
