"""`ray job submit` entrypoint for the extract stage alone.

    ray job submit --working-dir . -- python ray_jobs/extract_features.py \
        --config ray_jobs/configs/demo.yaml --manifest out/demo/manifest.parquet --out out/demo

Takes the same flags as `dermray extract` and runs the same stage function.
"""

import sys
from pathlib import Path

# the submitted working dir's code, whatever else is installed on the node
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dermray.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
