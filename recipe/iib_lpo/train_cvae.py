"""Entry point of the CVAE stage: ``python -m recipe.iib_lpo.train_cvae --help``.

The implementation is ``recipe.iib_lpo.latent.training``."""

import sys

from recipe.iib_lpo.latent.training import main

if __name__ == "__main__":
    main(sys.argv[1:])
