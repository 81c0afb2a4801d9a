"""Entry point of the CSI plugin (`opensds-csi`). The services arrive with the CSI issue."""
from __future__ import annotations

import sys


def main() -> None:
    sys.exit("opensds-csi: the CSI services are not part of this release yet")
