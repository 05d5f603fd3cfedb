"""`megaswift pt` saving the distributed optimizer as megaswift did before fully_reshardable (dp_reshardable),
to make old-format checkpoints for the tests. Run it like `python -m megaswift pt`: the flags are the same."""
import sys

import megaswift.checkpointing.state as state
from megaswift.cli.main import main

if __name__ == "__main__":  # dist_checkpointing's writer process re-imports __main__
    state.SAVED_SHARDING_TYPE = state.LEGACY_SHARDING_TYPE
    sys.exit(main(["pt", *sys.argv[1:]]))
