"""`python -m alignpress.node_exit EXIT_DIR CODE`: sky/run.sh on several nodes, after this node's
`accelerate launch` failed. The launcher exits 1 for every failure and ends on torch's report; this
says the failure of this node's processes last, as one line, and exits with its code (2 for a
refusal, 3 for a failed check, 143 for a SIGTERM), as `run` does for the processes it relaunches
itself (cli.launched_failure reads the same records)."""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import launched_failure


def main(argv: list[str]) -> int:
    folder, code = argv
    failure = launched_failure(Path(folder), int(code))
    print(f"error: {failure}", file=sys.stderr)
    return failure.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
