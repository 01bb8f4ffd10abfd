"""Run a command as PID 1 of its own PID namespace, the way a training container runs its
main process: a signal sent to it is delivered only if it installed a handler, and its
children are not signalled with it. `unshare --pid --fork --mount-proc` needs root.

The mount namespace that comes with --mount-proc also lets the container see its own
/opt (holding /opt/ml) and an /etc/hosts where algo-1 resolves, as SageMaker's network
does, without touching this machine's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

# Mounts, then exec: PID 1 is exactly the command that follows.
PRELUDE = 'mount --bind "$0" /opt && mount --bind "$1" /etc/hosts && shift && exec "$@"'


def usable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root (unshare --pid --mount)"
    if not shutil.which("unshare"):
        return "needs util-linux unshare"
    return None


class Container:
    def __init__(self, command: list[str], *, opt: Path, env: dict[str, str], log: Path):
        hosts = opt.parent / "hosts"
        # this machine's names (torchrun's rendezvous uses its hostname) and algo-1
        hosts.write_text(Path("/etc/hosts").read_text() + "\n127.0.0.1 algo-1\n")
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", PRELUDE, str(opt), str(hosts), *command],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def pid1(self, timeout: float = 10) -> int:
        """PID 1 of the namespace, as this machine numbers it: unshare's one child."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid:
                    return int(stat.parent.name)
            time.sleep(0.05)
        raise TimeoutError("the container's main process did not start")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None or time.time() > deadline:
                self.kill()
                raise AssertionError(f"no {needle!r} in the container log:\n{self.text()[-4000:]}")
            time.sleep(0.2)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the container ran past {timeout} s:\n{self.text()[-4000:]}") from None

    def kill(self) -> None:
        """SIGKILL to PID 1 ends the namespace and every process in it."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid1(timeout=1), 9)
            except (TimeoutError, ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)
