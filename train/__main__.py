"""python -m train --help"""

import sys

from train.main import main

sys.exit(main())
