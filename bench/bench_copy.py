"""Same as ``kvtier bench copy``: python bench/bench_copy.py --json out.json"""

import sys

from kvtier.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "copy", *sys.argv[1:]]))
