import sys

from logquant.cli import main

sys.exit(main())
