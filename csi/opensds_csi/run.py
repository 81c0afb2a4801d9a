"""Running host tools: one place that turns a failed command into a CSI error with its stderr.

Credentials some tools only take as arguments (nvme-cli's DH-HMAC-CHAP secrets, iscsiadm's CHAP
settings) are passed as `secrets`: they are masked in every log line and error message.
"""
from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterable

from .errors import CsiError

log = logging.getLogger(__name__)


def _masked(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class CommandFailed(CsiError):
    def __init__(self, args: list[str], returncode: int, stderr: str, secrets: Iterable[str] = ()) -> None:
        secrets = list(secrets)
        super().__init__(_masked(f"{' '.join(args)} failed ({returncode}): {stderr.strip()}", secrets))
        self.returncode = returncode
        self.stderr = _masked(stderr, secrets)


def run(*args: str, ok_codes: tuple[int, ...] = (0,), secrets: Iterable[str] = ()) -> subprocess.CompletedProcess[str]:
    secrets = [s for s in secrets if s]
    log.debug("running %s", _masked(" ".join(args), secrets))
    result = subprocess.run(list(args), capture_output=True, text=True)
    if result.returncode not in ok_codes:
        raise CommandFailed(list(args), result.returncode, result.stderr or result.stdout, secrets)
    return result
