"""`ray job submit` entrypoint for the search stage alone (heads on existing embeddings).

    ray job submit --working-dir . -- python ray_jobs/search_heads.py \
        --config ray_jobs/configs/demo.yaml --out out/demo
"""

import sys

from dermray.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
