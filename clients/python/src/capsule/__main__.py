"""python -m capsule: the command line (capsule.cli)."""
import sys

from .cli import main

sys.exit(main())
