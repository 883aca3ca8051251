"""The `edge-client` command (the device side of the fleet)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("edge-client: the MQTT edge client is not implemented yet (see docs/protocol.md and the fleet issue); "
          "use `fedgen simulate` for the in-process federation.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
