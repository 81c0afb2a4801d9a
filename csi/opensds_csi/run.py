"""Running host tools: one place that turns a failed command into a CSI error with its stderr."""
from __future__ import annotations

import logging
import subprocess

from .errors import CsiError

log = logging.getLogger(__name__)


class CommandFailed(CsiError):
    def __init__(self, args: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(args)} failed ({returncode}): {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


def run(*args: str, ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    log.debug("running %s", " ".join(args))
    result = subprocess.run(list(args), capture_output=True, text=True)
    if result.returncode not in ok_codes:
        raise CommandFailed(list(args), result.returncode, result.stderr or result.stdout)
    return result
