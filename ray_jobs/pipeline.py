"""`ray job submit` entrypoint for the whole pipeline: validate -> split -> extract -> search ->
evaluate -> export, every stage whose section the config has.

    ray job submit --working-dir . -- python ray_jobs/pipeline.py \
        --config ray_jobs/configs/demo.yaml --out out/demo
"""

import sys
from pathlib import Path

# the submitted working dir's code, whatever else is installed on the node
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dermray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
