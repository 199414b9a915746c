"""Delete a TPU VM / pod slice, or its queued resource (which deletes the node with it).

    python tpu/teardown.py --name my-pod --zone us-central2-b            # asks first
    python tpu/teardown.py --name my-pod --zone us-central2-b --queued --yes
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tpu import common  # noqa: E402


def build_parser():
    p = common.base_parser(__doc__)
    p.add_argument("--queued", action="store_true",
                   help="delete the queued resource of this name (and its node)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    return p


def delete_command(args, queued: bool) -> list[str]:
    """`tpu-vm delete` or `queued-resources delete --force` (gcloud's own prompt is skipped)."""
    common.check_name("--name", args.name)
    if queued:
        return common.gcloud_tpu(args, "queued-resources", "delete", args.name) + [
            "--force", "--quiet"]
    return common.gcloud_tpu(args, "tpu-vm", "delete", args.name) + ["--quiet"]


def confirm(prompt: str) -> bool:
    """Asks y/N on the terminal; refuses (ValueError) when there is no terminal to ask on."""
    if not sys.stdin or not sys.stdin.isatty():
        raise ValueError("refusing to delete without confirmation: no terminal to ask on; "
                         "pass --yes")
    return input(prompt).strip().lower() in ("y", "yes")


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd = delete_command(args, args.queued)
    what = f"{'queued resource' if args.queued else 'TPU'} {args.name} in {args.zone}"
    if not args.dry_run and not args.yes and not confirm(f"Delete {what}? [y/N] "):
        common.note("not deleted")
        return 1
    common.Runner(args.dry_run).run(cmd)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
