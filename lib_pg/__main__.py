"""python -m lib_pg inspect ACTIVE BASE [--plot FILE.png]
python -m lib_pg bake ACTIVE BASE --omega 0.5 OUT.safetensors
python -m lib_pg find-base ACTIVE CANDIDATE...
python -m lib_pg extract ACTIVE BASE [--budget MIB] -o OUT.safetensors"""

import sys

from lib_pg.inspector import main

if __name__ == "__main__":
    sys.exit(main())
