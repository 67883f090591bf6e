"""Training for the built-in tasks: `python -m train --help`."""
