"""python -m lib_pg inspect ACTIVE BASE [--plot FILE.png]
python -m lib_pg bake ACTIVE BASE --omega 0.5 OUT.safetensors
python -m lib_pg find-base ACTIVE CANDIDATE...
python -m lib_pg extract ACTIVE BASE [--budget MIB] -o OUT.safetensors"""

import os
import sys

# Before torch loads OpenMP: its threads sleep at a barrier instead of spinning,
# so a machine that also runs something else does not stall every parallel
# step (extract's factoring: 42 s with 2 threads at load 2–3 on 2 cores, 217 s
# spinning; bench/RESULTS.md). An OMP_WAIT_POLICY already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lib_pg.inspector import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
