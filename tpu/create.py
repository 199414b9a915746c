"""Create a TPU VM or pod slice, directly or through a queued resource.

    python tpu/create.py --name my-pod --zone us-central2-b --accelerator_type v4-32 --spot
    python tpu/create.py --name my-pod --zone us-central2-b --accelerator_type v4-32 --queued --spot

A queued resource waits until capacity is free and then creates the node (same name as the
queued resource); it is the recommended way to get spot pod slices.
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
    p.add_argument("--accelerator_type", "--accelerator-type", dest="accelerator_type",
                   required=True, help="e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8")
    p.add_argument("--version", default=None,
                   help="TPU software/runtime version (default: by generation, e.g. "
                        "tpu-ubuntu2204-base for v4, v2-alpha-tpuv6e for v6e)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="spot VMs (cheap, preemptible)")
    kind.add_argument("--preemptible", action="store_true",
                      help="legacy preemptible VMs (not available with --queued)")
    p.add_argument("--queued", action="store_true",
                   help="create through `queued-resources create` (waits for capacity)")
    p.add_argument("--valid_until_duration", default=None,
                   help="with --queued: give up if not provisioned within this duration, e.g. 6h")
    p.add_argument("--reserved", action="store_true", help="use reserved capacity")
    p.add_argument("--async", dest="async_", action="store_true",
                   help="return without waiting for the operation to finish")
    return p


def create_command(args) -> list[str]:
    """The gcloud command that creates the node (validates the flags)."""
    gen, _ = common.parse_accelerator_type(args.accelerator_type)
    common.check_name("--name", args.name)
    version = args.version or common.DEFAULT_VERSIONS[gen]
    if args.queued:
        if args.preemptible:
            raise ValueError("--preemptible is not supported with --queued; use --spot")
        cmd = common.gcloud_tpu(args, "queued-resources", "create", args.name) + [
            "--node-id", args.name, "--accelerator-type", args.accelerator_type,
            "--runtime-version", version]
        if args.valid_until_duration:
            cmd += ["--valid-until-duration", args.valid_until_duration]
    else:
        if args.valid_until_duration:
            raise ValueError("--valid_until_duration needs --queued")
        cmd = common.gcloud_tpu(args, "tpu-vm", "create", args.name) + [
            "--accelerator-type", args.accelerator_type, "--version", version]
        if args.preemptible:
            cmd.append("--preemptible")
    if args.spot:
        cmd.append("--spot")
    if args.reserved:
        cmd.append("--reserved")
    if args.async_:
        cmd.append("--async")
    return cmd


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cmd = create_command(args)
    common.Runner(args.dry_run).run(cmd)
    if not args.dry_run:
        common.save_state(args.state_dir, args.name, "create", argv)
        hosts = common.num_hosts(args.accelerator_type)
        common.note(f"{args.name}: {args.accelerator_type} ({hosts} worker"
                    f"{'s' if hosts > 1 else ''}). Next: python tpu/setup.py --name {args.name} "
                    f"--zone {args.zone}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
