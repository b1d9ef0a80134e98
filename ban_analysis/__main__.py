"""``python -m ban_analysis ...``: the ``ban-analysis`` command; also what torchrun starts:
``torchrun --nproc_per_node=2 -m ban_analysis run CONFIG ...`` (README, "Many GPUs")."""

import sys

from ban_analysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
