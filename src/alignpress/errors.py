"""One error type for everything a user can fix: it names where the problem is (file and field)."""


class AlignpressError(Exception):
    """A problem with the user's input or environment, reported as one clear line and exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        where = ""
        if source and field:
            where = f"{source}: field '{field}': "
        elif source:
            where = f"{source}: "
        elif field:
            where = f"field '{field}': "
        super().__init__(where + message)


class StageFailed(AlignpressError):
    """A stage ran but its result failed a check (for example a merge that changed nothing)."""

    exit_code = 3


class Preempted(AlignpressError):
    """SIGTERM (a spot preemption notice) stopped training after saving a checkpoint."""

    exit_code = 143
