import sys

from fcapp.cli import main

sys.exit(main())
