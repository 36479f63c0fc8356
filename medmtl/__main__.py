import sys

from medmtl.cli import main

sys.exit(main())
