"""Create and list the per-robot keys that authenticate messages between robots and the server.

    python -m edge_vlm_ros.tools.keys create --robots robot_0 robot_1 [--dir DIR] [--rotate]
    python -m edge_vlm_ros.tools.keys list [--dir DIR]

A key file `<robot>.key` (32 random bytes, hex, mode 0600) must be on the robot (its edge node and
controller) and on the server; nothing else should read it. The default folder is
$EDGE_VLM_KEYS_DIR or ~/.config/edge_vlm_ros/keys; nodes take it as the auth_keys_dir parameter.
"""

from __future__ import annotations

import argparse
import stat
import sys

from ..core.auth import create_key, key_path, load_key, resolve_keys_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create keys that do not exist yet (--rotate: replace them)")
    c.add_argument("--robots", nargs="+", required=True)
    c.add_argument("--dir", default=None)
    c.add_argument("--rotate", action="store_true", help="replace existing keys (copy them anew everywhere)")
    s = sub.add_parser("list", help="the keys in a folder and whether each is usable")
    s.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    keys_dir = resolve_keys_dir(args.dir)
    if args.cmd == "create":
        for r in args.robots:
            existed = key_path(keys_dir, r).exists()
            path = create_key(keys_dir, r, overwrite=args.rotate)
            print(f"{r}: {path} ({'replaced' if existed and args.rotate else 'kept' if existed else 'created'})")
        return 0
    if not keys_dir.is_dir():
        print(f"no key folder at {keys_dir}")
        return 1
    bad = 0
    for path in sorted(keys_dir.glob("*.key")):
        robot = path.stem
        try:
            load_key(keys_dir, robot)
            state = "ok"
        except (OSError, ValueError) as e:
            state, bad = f"unusable: {e}", bad + 1
        print(f"{robot}: {path} mode {stat.S_IMODE(path.stat().st_mode):o} {state}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
