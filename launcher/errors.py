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


class Interrupted(LauncherError):
    """Ctrl-C while following or running in the foreground."""

    exit_code = 130
