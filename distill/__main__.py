"""`accelerate launch -m forcelab.distill CONFIG [key=value ...]`: the distill subcommand per process."""

import sys

from ..cli import main

sys.exit(main(["distill", *sys.argv[1:]]))
