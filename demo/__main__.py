"""``python -m demo``: the whole loop end to end on embedded defaults (``make demo``)."""

import sys

from demo.run import main

sys.exit(main())
