"""The launcher's errors: one small tree, each carrying what to do next.

The CLI prints these without a traceback and maps them to the SPEC's exit codes.
"""

from __future__ import annotations


class LauncherError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  -> {self.hint}"


class ConfigError(LauncherError):
    """The config or the command line is wrong; nothing was sent to AWS."""

    exit_code = 2

    def __init__(self, problems: list[tuple[str, str]] | str, hint: str | None = None):
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems = problems
        lines = [f"{path}: {msg}" if path else msg for path, msg in problems]
        head = "invalid config" if len(lines) > 1 else lines[0]
        body = head if len(lines) == 1 else head + f" ({len(lines)} problems):\n" + "\n".join(f"  {x}" for x in lines)
        super().__init__(body, hint)


class AWSError(LauncherError):
    """AWS refused the request or could not be reached (after retries)."""

    exit_code = 3


class JobFailed(LauncherError):
    """The training job ended Failed or Stopped."""

    exit_code = 1


class DiskError(LauncherError):
    """A file could not be written or read here: full, read-only, or not a directory."""

    exit_code = 1


def disk_error(exc: OSError, action: str = "") -> DiskError:
    """One line naming the path and the cause: "no space left on /data/adapter"."""
    import errno

    path = exc.filename or "?"
    cause = {errno.ENOSPC: f"no space left on {path}", errno.EDQUOT: f"disk quota exceeded on {path}",
             errno.EROFS: f"{path} is on a read-only file system", errno.EACCES: f"permission denied: {path}",
             errno.EPERM: f"permission denied: {path}", errno.EEXIST: f"{path} exists already",
             errno.ENOTDIR: f"{path}: a part of this path is a file, not a directory",
             errno.EISDIR: f"{path} is a directory"}.get(exc.errno, f"{path}: {exc.strerror or exc}")
    hint = "free some space and try again" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
    return DiskError(f"{action}: {cause}" if action else cause, hint)


class Interrupted(LauncherError):
    """Ctrl-C while following or running in the foreground."""

    exit_code = 130
