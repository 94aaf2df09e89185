"""`python -m clipjax.cli ...`."""

import sys

from clipjax.cli import main

sys.exit(main())
