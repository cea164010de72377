"""``python -m recipe.iib_lpo.study [--arms ...] [--seeds 0 1 2] [--out DIR] [--results DIR] [--report-only] [--smoke]``"""

import sys

from recipe.iib_lpo.study.driver import main

if __name__ == "__main__":
    sys.exit(main())
