"""Running host tools: one place that turns a failed command into a CSI error with its stderr.

Every command has a deadline: a hung tool (iscsiadm waiting on a dead portal, blkid on a
device that stopped answering) must not hold a volume's lock, and a gRPC worker, forever. On
expiry the whole process group is killed and the call fails with DEADLINE_EXCEEDED, which
kubelet treats as "outcome uncertain" and retries (every node operation is idempotent). A
process stuck in uninterruptible sleep survives SIGKILL; it is then left to a reaper thread
rather than waited for.

A tool that is not installed is ToolMissing (FAILED_PRECONDITION naming the Debian package
that provides it, from opensds_operator.hosttools), not an INTERNAL FileNotFoundError.

Secrets never go on a command line (/proc/<pid>/cmdline is world-readable): connectors hand
them to the kernel or a tool through files or device writes. `secrets` still masks anything
that might echo one back in a log line or error message.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterable

from opensds_operator.hosttools import is_missing_executable

from .errors import CsiError, DeadlineExceeded, ToolMissing

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 90.0  # seconds; below kubelet's own per-call timeout of 2 minutes
REAP_GRACE = 5.0        # how long a killed process gets to disappear before it is abandoned


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


class CommandTimedOut(DeadlineExceeded):
    def __init__(self, args: list[str], timeout: float, secrets: Iterable[str] = ()) -> None:
        super().__init__(_masked(f"{' '.join(args)} did not finish within {timeout:g} s and was killed; "
                                 f"the call is retried", secrets))


def _kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL the command's process group; reap it in the background if it will not die now."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    try:
        process.communicate(timeout=REAP_GRACE)
    except subprocess.TimeoutExpired:  # uninterruptible sleep: do not let it hold this thread too
        log.error("%s (pid %d) ignores SIGKILL (stuck in the kernel); leaving it to a reaper", process.args,
                  process.pid)
        threading.Thread(target=process.wait, name=f"reap-{process.pid}", daemon=True).start()


def run(*args: str, ok_codes: tuple[int, ...] = (0,), secrets: Iterable[str] = (),
        timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    secrets = [s for s in secrets if s]
    log.debug("running %s", _masked(" ".join(args), secrets))
    # A session of its own: the kill reaches helpers the tool forked (mkfs, iscsiadm -> iscsid IPC).
    try:
        process = subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
    except FileNotFoundError as e:
        if is_missing_executable(e, args):  # FAILED_PRECONDITION naming the Debian package
            raise ToolMissing(args[0]) from e
        raise
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        raise CommandTimedOut(list(args), timeout, secrets) from None
    result = subprocess.CompletedProcess(list(args), process.returncode, stdout, stderr)
    if result.returncode not in ok_codes:
        raise CommandFailed(list(args), result.returncode, result.stderr or result.stdout, secrets)
    return result
