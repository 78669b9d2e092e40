"""`python -m dynamicfs` runs the CLI."""

import sys

from dynamicfs.cli.main import main

sys.exit(main())
