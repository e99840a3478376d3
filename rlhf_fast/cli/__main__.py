import sys

from rlhf_fast.cli.app import main

sys.exit(main())
