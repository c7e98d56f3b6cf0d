"""``python -m chatstream``: the same command line as ``chatstream``."""

from chatstream.cli import main

# vLLM starts its processes with "spawn", which imports __main__ again in each child: run only when executed.
if __name__ == "__main__":
    raise SystemExit(main())
