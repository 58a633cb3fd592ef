"""A child process says "I got here" through a pipe; the test blocks on it instead of polling or sleeping.

Usage::

    ready = ReadyPipe()
    process = subprocess.Popen(command, env={**os.environ, **ready.env}, pass_fds=ready.pass_fds)
    assert ready.wait(process), "the child never got there"
    os.kill(process.pid, signal.SIGINT)

and in the child, at the point the test waits for::

    os.write(int(os.environ["MATSCIML_TEST_READY_FD"]), b"ready\\n")
"""

from __future__ import annotations

import os
import select
import subprocess

ENV = "MATSCIML_TEST_READY_FD"


class ReadyPipe:
    """One pipe per child: its write end goes to the child, the test reads the other."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()

    @property
    def env(self) -> dict[str, str]:
        return {ENV: str(self.write_fd)}

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.write_fd,)

    def wait(self, process: subprocess.Popen, timeout: float = 300) -> bool:
        """Block until the child signals (True), or exits or ``timeout`` passes first (False).

        The parent's write end is closed here, after the child has its copy, so a child that dies
        without signalling ends the wait at once (end of file) instead of at the timeout.
        """
        os.close(self.write_fd)
        try:
            readable, _, _ = select.select([self.read_fd], [], [], timeout)
            return bool(readable) and os.read(self.read_fd, 64).startswith(b"ready")
        finally:
            os.close(self.read_fd)
