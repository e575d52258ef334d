"""``python -m tests.localnode up|down|status|check``: what ``make cluster`` and ``make cluster-down`` run."""

from __future__ import annotations

import argparse
import sys

from tests.localnode import node


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.localnode", description=__doc__)
    parser.add_argument("command", choices=("up", "down", "status", "check"))
    args = parser.parse_args()
    try:
        if args.command == "up":
            node.preflight()
            if node.running():
                print("localnode: a local cluster is already running; nothing changed", file=sys.stderr)
            else:
                node.Node().up()
            print(node.exports(), end="")
        elif args.command == "down":
            if node.leftovers() or node.running():
                return 1 if node.down() else 0
            print("localnode: no local cluster here, nothing to do", file=sys.stderr)
        elif args.command == "check":
            node.preflight()  # raises with the reason this machine cannot run the cluster
        elif node.running():
            print(node.exports(), end="")
        else:
            print("localnode: not running", file=sys.stderr)
            return 1
    except node.NodeError as exc:
        print(f"localnode: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
