#!/usr/bin/env python3
"""Write a DeepSpeed hostfile from the SLURM allocation and print (or run) the launch command.

    python examples/slurm/make_hostfile.py --out hostfile -- --module megaponder train --config C
    python examples/slurm/make_hostfile.py --nodelist 'gpu[01-02]' --slots 8 --dry-run -- CMD...
    python examples/slurm/make_hostfile.py --out hostfile --exec -- CMD...   # train.sbatch

One ``HOST slots=N`` line per node, in SLURM's order: the node list is expanded by
``scontrol show hostnames`` where SLURM is installed, else by python-hostlist (the same
expansion; megaponder.nodelist.expand_nodelist, tests/cluster/test_slurm.py compares the two). The launcher is the ``deepspeed``
next to this Python (the venv's), with the first node as master; with one node it skips
DeepSpeed's ssh check (a single node is launched locally, without pdsh). CMD are the launcher's
arguments after its own options (default: ``--module megaponder train``). --dry-run prints the
hostfile and the command, writes and runs nothing; --exec writes the hostfile and replaces
this process with the launcher.
"""
import argparse
import os
import shlex
import sys

# scontrol's expansion (python-hostlist without SLURM); torch-free: the job's first step stays fast
from megaponder.nodelist import expand_nodelist


def slots_from_env(env=os.environ) -> int:
    """GPUs per node if the job has any, else tasks per node (a CPU job), else 1."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(name, "").split("(")[0].split(",")[0]  # "8(x2)" -> 8
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def launch_command(hosts, hostfile, master_port, cmd) -> list[str]:
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.exists(launcher):
        launcher = "deepspeed"
    single = ["--no_ssh_check"] if len(hosts) == 1 else []
    return ([launcher, "--hostfile", hostfile, "--master_addr", hosts[0],
             "--master_port", str(master_port)] + single + (cmd or ["--module", "megaponder", "train"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"))
    ap.add_argument("--slots", type=int, default=None,
                    help="ranks per node (default: SLURM_GPUS_ON_NODE, else SLURM_NTASKS_PER_NODE)")
    ap.add_argument("--out", default="hostfile")
    ap.add_argument("--master-port", type=int, default=29500)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the hostfile and the command only")
    mode.add_argument("--exec", action="store_true", help="write the hostfile, then run the command")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="launcher arguments after --")
    a = ap.parse_args(argv)
    if not a.nodelist:
        ap.error("no --nodelist and SLURM_JOB_NODELIST is not set (not inside an allocation?)")
    try:
        hosts = expand_nodelist(a.nodelist)
    except ValueError as err:
        print(f"make_hostfile.py: {err}", file=sys.stderr)
        return 2
    slots = a.slots if a.slots is not None else slots_from_env()
    text = "".join(f"{h} slots={slots}\n" for h in hosts)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    launch = launch_command(hosts, a.out, a.master_port, cmd)
    if a.dry_run:
        print(f"# hostfile {a.out} ({len(hosts)} nodes x {slots} slots = {len(hosts) * slots} ranks)")
        print(text, end="")
        print("# would run: " + shlex.join(launch))
        return 0
    with open(a.out, "w") as f:
        f.write(text)
    print(shlex.join(launch), flush=True)
    if a.exec:
        os.execvp(launch[0], launch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
