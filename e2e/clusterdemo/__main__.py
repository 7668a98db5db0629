import sys

from clusterdemo import main

sys.exit(main())
