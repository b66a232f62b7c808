#!/usr/bin/env python3
"""alignpress job entry point: `python entrypoint.py run recipes/demo.yaml` (see README)."""
import os
import sys

# Run from a source checkout without installing: the package lives in src/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from alignpress.cli import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    # Done and reported. Python's last garbage collections would walk every object torch and
    # transformers made: 1.3 to 1.5 s after the last line on 2 cores (py-spy: gc_collect_main), in
    # which a SIGTERM still turned a finished run's exit status into 143. Freezing them skips that
    # walk; the exit handlers (logging's flush, temporary folders, trackers) still run.
    import gc

    gc.freeze()
    sys.exit(code)
