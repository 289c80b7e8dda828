"""``python -m hybrid_ct.train`` / ``torchrun -m hybrid_ct.train``: the distributed training entry point."""
import sys

from hybrid_ct.train.distributed import main

sys.exit(main())
