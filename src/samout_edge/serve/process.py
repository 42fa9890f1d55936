"""`samout-edge serve` as a child process: what the load test, the demo and the
kill -9 tests start, stop and kill. The child prints one banner line on stderr
("serving ... on http://HOST:PORT; ...") once its socket is bound; this waits
for it and then for /health."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from samout_edge.errors import SamoutError


class ServerProcess:
    def __init__(self, target: str | Path, *options: str, timeout: float = 60.0):
        command = [sys.executable, "-m", "samout_edge", "serve", str(target), "--port", "0", *options]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.banner = self.proc.stderr.readline().strip()
        if " on http://" not in self.banner:
            rest = self.proc.stderr.read()[-2000:]
            self.kill()
            raise SamoutError(f"samout-edge serve did not start: {self.banner} {rest}".strip())
        self.url = self.banner.split(" on ", 1)[1].split(";", 1)[0].strip()
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1).close()
                return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise SamoutError(f"samout-edge serve at {self.url} never answered /health") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does."""
        self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM: a graceful stop; returns the exit code."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()
        elif not self.proc.stderr.closed:
            self.proc.stderr.close()
