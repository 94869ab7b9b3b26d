"""``python -m semcorr.modeling.convert_pmd_original_checkpoint``: kept so existing commands work.

The converter lives in :mod:`semcorr.modeling.pmd.convert_pmd_original_checkpoint`.
"""

import sys

from .pmd.convert_pmd_original_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
