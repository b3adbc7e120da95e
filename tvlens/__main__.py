import sys

from tvlens.cli import main

sys.exit(main())
