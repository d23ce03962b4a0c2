"""``python -m mae_core.params``: the earlier name of ``python -m mae_core.audit``, kept for scripts."""

import sys

from mae_core.audit import main

if __name__ == "__main__":
    sys.exit(main())
