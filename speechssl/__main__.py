import sys

from speechssl.cli import main

sys.exit(main())
