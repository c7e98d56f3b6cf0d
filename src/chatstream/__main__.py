"""``python -m chatstream``: the same command line as ``chatstream``."""

from chatstream.cli import main

raise SystemExit(main())
