"""`accelerate launch -m forcelab.train CONFIG [key=value ...]`: the train subcommand per process."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
