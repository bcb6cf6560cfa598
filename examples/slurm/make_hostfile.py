#!/usr/bin/env python3
"""Write a DeepSpeed hostfile from the SLURM allocation and print the launch command.

    python examples/slurm/make_hostfile.py --out hostfile            # inside an allocation
    python examples/slurm/make_hostfile.py --nodelist 'gpu[01-02]' --slots 8 --dry-run

--dry-run prints the hostfile and the command without writing or running anything, so it
can be tested without SLURM (tests/test_parallel_launch.py).
"""
import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megaponder.parallel.state import expand_nodelist  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"))
    ap.add_argument("--slots", type=int, default=int(os.environ.get("SLURM_GPUS_ON_NODE")
                                                     or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]))
    ap.add_argument("--out", default="hostfile")
    ap.add_argument("--master-port", type=int, default=29500)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="training command after --")
    a = ap.parse_args(argv)
    if not a.nodelist:
        ap.error("no --nodelist and SLURM_JOB_NODELIST is not set (not inside an allocation?)")
    hosts = expand_nodelist(a.nodelist)
    text = "".join(f"{h} slots={a.slots}\n" for h in hosts)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    launch = ["deepspeed", "--hostfile", a.out, "--master_addr", hosts[0],
              "--master_port", str(a.master_port)] + (cmd or ["-m", "megaponder", "train"])
    if a.dry_run:
        print(f"# hostfile {a.out} ({len(hosts)} nodes x {a.slots} slots = {len(hosts) * a.slots} ranks)")
        print(text, end="")
        print("# would run: " + shlex.join(launch))
        return 0
    with open(a.out, "w") as f:
        f.write(text)
    print(shlex.join(launch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
