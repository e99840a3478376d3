import sys

from rlhf_fast.bench.runner import main

sys.exit(main())
