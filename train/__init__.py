"""Training of any `t2d.Task`, built in or a user's own: `python -m train --help`."""
