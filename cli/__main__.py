import sys

from nnserve.cli import main

sys.exit(main())
