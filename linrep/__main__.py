import sys

from linrep.cli import main

sys.exit(main())
