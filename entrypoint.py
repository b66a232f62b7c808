#!/usr/bin/env python3
"""alignpress job entry point: `python entrypoint.py run recipes/demo.yaml` (see README)."""
import os
import sys

# Run from a source checkout without installing: the package lives in src/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from alignpress.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
