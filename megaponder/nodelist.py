"""SLURM node lists (``gpu[01-03,07],login1``) expanded to host names, without torch.

Its own small module because examples/slurm/make_hostfile.py runs it as the first step of
every train.sbatch job: importing it must not cost a torch import. megaponder.parallel.state
(the launcher environment) uses it too.
"""
from __future__ import annotations

import shutil
import subprocess

try:  # optional: SLURM node lists where scontrol is absent
    import hostlist
except ImportError:  # pragma: no cover - installed by requirements/cpu.txt
    hostlist = None


def expand_nodelist(nodelist: str, *, use_scontrol: bool = True) -> list[str]:
    """A SLURM node list as SLURM expands it: ``gpu[01-03,07],login1`` -> gpu01 gpu02 gpu03
    gpu07 login1; ``r[1-2]n[01-02]`` -> r1n01 r1n02 r2n01 r2n02. SLURM's own ``scontrol show
    hostnames`` where it is installed (every SLURM node), else python-hostlist (an optional
    dependency: GPL-2.0+, so not required by this Apache-2.0 package);
    tests/cluster/test_slurm.py checks that both agree with scontrol."""
    scontrol = shutil.which("scontrol") if use_scontrol else None
    if scontrol:
        out = subprocess.run([scontrol, "show", "hostnames", nodelist.strip()],
                             capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.split():
            why = (out.stderr or out.stdout or "no hosts").strip().splitlines()[-1]
            raise ValueError(f"scontrol cannot expand the SLURM node list {nodelist!r}: {why}")
        return out.stdout.split()
    if hostlist is None:
        raise ValueError(f"cannot expand the SLURM node list {nodelist!r}: neither scontrol (SLURM) "
                         f"nor python-hostlist is installed; `pip install python-hostlist`.")
    try:
        return hostlist.expand_hostlist(nodelist.strip(), allow_duplicates=True)
    except hostlist.BadHostlist as err:
        raise ValueError(f"cannot expand the SLURM node list {nodelist!r}: {err}") from None

