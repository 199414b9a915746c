"""Install sparsejax on every worker of a TPU VM / pod slice.

    python tpu/setup.py --name my-pod --zone us-central2-b              # copy this checkout
    python tpu/setup.py --name my-pod --zone us-central2-b \\
        --repo_url https://github.com/ORG/sparsejax.git --branch main    # or clone on each worker

The code lands in ~/sparsejax on each worker (replacing an older copy) and is installed with
`pip install -e '.[tpu]'`. Copying packs the checkout (without .venv, .git and caches) into one
tarball, so each worker receives a single file rather than thousands.
"""
from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tpu import common  # noqa: E402

# Mirrors .gitignore: nothing a worker needs, and .venv alone is gigabytes.
EXCLUDES = (".venv", ".ci-venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache",
            ".hypothesis", "./build", "./workdir*", "./tmp", ".ci-data", "runs")


def build_parser():
    p = common.base_parser(__doc__)
    p.add_argument("--repo_url", default=None,
                   help="git URL to clone on each worker (default: copy the local checkout)")
    p.add_argument("--branch", default="main", help="branch or tag to clone with --repo_url")
    p.add_argument("--source", type=Path, default=common.REPO_ROOT,
                   help="local checkout to copy when no --repo_url (default: %(default)s)")
    p.add_argument("--extras", default="tpu",
                   help="pip extras to install, comma-separated (default: %(default)s)")
    p.add_argument("--wait", action="store_true",
                   help="first wait until the TPU is READY (e.g. after create --queued)")
    p.add_argument("--queued", action="store_true",
                   help="with --wait: the TPU comes from a queued resource of the same name")
    return p


def setup_commands(args) -> list[list[str]]:
    """Commands that put the code on every worker and install it (validates the flags)."""
    common.check_name("--name", args.name)
    for extra in args.extras.split(","):
        common.check_name("--extras", extra)
    repo = f'"$HOME/{common.REMOTE_REPO}"'
    cmds: list[list[str]] = []
    if args.repo_url:
        if not args.branch:
            raise ValueError("--branch must not be empty")
        fetch = (f"rm -rf {repo} && git clone --depth 1 --branch {shlex.quote(args.branch)} "
                 f"{shlex.quote(args.repo_url)} {repo}")
        cmds.append(common.ssh(args, fetch))
    else:
        src = Path(args.source).resolve()
        if not (src / "pyproject.toml").is_file():
            raise ValueError(f"--source={str(args.source)!r} is not a sparsejax checkout "
                             "(no pyproject.toml there)")
        tarball = str(Path(tempfile.gettempdir()) / f"sparsejax-src-{args.name}.tgz")
        remote_tgz = "sparsejax-src.tgz"  # in the worker's home directory
        cmds.append(["tar", "-czf", tarball, *(f"--exclude={e}" for e in EXCLUDES),
                     "-C", str(src), "."])
        cmds.append(common.gcloud_tpu(args, "tpu-vm", "scp", tarball,
                                      f"{args.name}:{remote_tgz}") + ["--worker=all"])
        cmds.append(common.ssh(args, f'rm -rf {repo} && mkdir -p {repo} && tar -xzf '
                                     f'"$HOME/{remote_tgz}" -C {repo} && rm "$HOME/{remote_tgz}"'))
    install = (f"cd {repo} && python3 -m pip install -q --upgrade pip && "
               f"python3 -m pip install -e {shlex.quote(f'.[{args.extras}]')}")
    cmds.append(common.ssh(args, install))
    return cmds


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cmds = setup_commands(args)
    runner = common.Runner(args.dry_run)
    if args.wait:
        common.wait_ready(args, runner, queued=args.queued)
    for cmd in cmds:
        runner.run(cmd)
    if not args.dry_run:
        common.save_state(args.state_dir, args.name, "setup", argv)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
