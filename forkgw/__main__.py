import sys

from forkgw.cli import main

sys.exit(main())
