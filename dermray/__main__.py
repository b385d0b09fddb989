"""``python -m dermray`` runs the same command line as ``dermray``."""

from dermray.cli import main

raise SystemExit(main())
