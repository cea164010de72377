import sys

from recipe.iib_lpo.eval.cli import main

# guarded: the diversity workers are spawned processes, which re-import the main module
if __name__ == "__main__":
    sys.exit(main())
