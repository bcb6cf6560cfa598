"""Topology and launcher mapping without processes; config-time refusals."""
import pytest

from megaponder.config import Config, ConfigError
from megaponder.train.preflight import preflight
from megaponder.parallel.state import (coords_of, expand_nodelist, group_ranks, launcher_env,
                                       rank_of, strip_local_rank_arg)


def test_torchrun_and_deepspeed_env():
    info = launcher_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                         "MASTER_ADDR": "node7", "MASTER_PORT": "1234",
                         "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})  # torchrun inside sbatch
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert (info.master_addr, info.master_port, info.source) == ("node7", 1234, "env")


def test_openmpi_env_defaults_to_loopback():
    info = launcher_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                         "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (info.rank, info.world_size, info.local_rank, info.source) == (1, 2, 1, "openmpi")
    assert info.master_addr == "127.0.0.1" and info.master_port == 29500


def test_pmi_and_slurm_env():
    info = launcher_env({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"})
    assert (info.rank, info.world_size, info.source) == (2, 4, "pmi")
    info = launcher_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                         "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert info.master_addr == "gpu07" and info.source == "slurm"


def test_single_process():
    info = launcher_env({})
    assert (info.rank, info.world_size, info.source) == (0, 1, "single")


@pytest.mark.parametrize("use_scontrol", [True, False])
def test_expand_nodelist(use_scontrol):
    """scontrol where SLURM is installed (else python-hostlist: both kinds of machine)."""
    def expand(text):
        return expand_nodelist(text, use_scontrol=use_scontrol)
    assert expand("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand("r[1-2]n[01-02]") == ["r1n01", "r1n02", "r2n01", "r2n02"]
    assert expand("a1,b[9-10]") == ["a1", "b9", "b10"]
    assert expand("single") == ["single"]


def test_strip_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    rest = strip_local_rank_arg(["--local_rank=3", "train", "--config", "x.yml"])
    assert rest == ["train", "--config", "x.yml"]
    import os
    assert os.environ["LOCAL_RANK"] == "3"


@pytest.mark.parametrize("tp,pp,world", [(2, 2, 8), (2, 1, 4), (1, 2, 2), (4, 2, 16)])
def test_group_ranks_partition_the_world(tp, pp, world):
    groups = group_ranks(world, tp, pp)
    dp = world // (tp * pp)
    for kind, size in (("tp", tp), ("dp", dp), ("pp", pp), ("mp", tp * pp)):
        flat = sorted(r for g in groups[kind] for r in g)
        assert flat == list(range(world)), kind
        assert all(len(g) == size for g in groups[kind])
    for r in range(world):
        t, d, p = coords_of(r, tp, dp)
        assert rank_of(t, d, p, tp, dp) == r
    # TP groups are consecutive ranks (one node), pipeline neighbours dp*tp apart
    assert groups["tp"][0] == list(range(tp))
    assert groups["pp"][0] == [p * dp * tp for p in range(pp)]


def _cfg(**par):
    cfg = Config()
    for k, v in par.items():
        section, key = k.split("__")
        setattr(getattr(cfg, section), key, v)
    return cfg


@pytest.mark.parametrize("changes,needle", [
    ({"parallel__tp": 3}, "num_heads"),
    ({"parallel__pp": 3}, "num_layers"),
    ({"parallel__pp": 2, "parallel__zero_stage": 2}, "zero_stage=2"),
    ({"parallel__pp": 2, "parallel__zero_stage": 3}, "zero_stage=3"),
    ({"parallel__sequence_parallel": True}, "tp > 1"),
    ({"parallel__tp": 2, "parallel__sequence_parallel": True, "data__seq_length": 7}, "seq_length"),
    ({"parallel__tp": 2, "ponder__top_k": 5}, "top_k"),
    ({"parallel__tp": 2, "parallel__sequence_parallel": True, "model__family": "ponderlm2"},
     "model.family=ponderlm2"),
])
def test_config_refuses_unsupported_layouts(changes, needle):
    with pytest.raises(ConfigError) as err:
        preflight(_cfg(**changes), check_paths=False)
    assert needle in str(err.value)


def test_world_size_must_be_multiple_of_tp_pp():
    cfg = _cfg(parallel__tp=2, parallel__pp=2)
    preflight(cfg, check_paths=False, world_size=8)
    with pytest.raises(ConfigError, match="multiple of tp\\*pp=4"):
        preflight(cfg, check_paths=False, world_size=6)


def test_deepspeed_config_is_explicit():
    from megaponder.train.engine import deepspeed_config
    from megaponder.parallel.state import Topology
    cfg = _cfg(parallel__zero_stage=1, optim__grad_clip=0.0)
    ds = deepspeed_config(cfg, Topology(world_size=4, tp=2, dp=2))
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["stage"] == 1
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum_steps * 2
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(_cfg(parallel__zero_stage=2), Topology(world_size=2, pp=2))


def test_row_chunks_cover_the_batch_in_order():
    from megaponder.parallel.pipeline import row_chunks
    for batch in range(1, 9):
        for chunks in range(1, 6):
            sl = row_chunks(batch, chunks)
            assert len(sl) == min(batch, chunks)
            rows = [r for s in sl for r in range(s.start, s.stop)]
            assert rows == list(range(batch))                      # contiguous, in order
            sizes = [s.stop - s.start for s in sl]
            assert max(sizes) - min(sizes) <= 1                    # as even as possible


def test_make_hostfile_does_not_import_torch():
    """examples/slurm/make_hostfile.py is the first step of every train.sbatch job: it expands
    the node list without importing torch (seconds per job start)."""
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    script = os.path.join(REPO_ROOT, "examples", "slurm", "make_hostfile.py")
    probe = ("import runpy, sys\n"
             f"sys.argv = [{script!r}, '--nodelist', 'gpu[01-02]', '--slots', '8', '--dry-run']\n"
             "try:\n"
             f"    runpy.run_path({script!r}, run_name='__main__')\n"
             "except SystemExit as stop:\n"
             "    assert stop.code == 0, stop.code\n"
             "print('torch imported:', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gpu01 slots=8\ngpu02 slots=8\n" in out.stdout
    assert out.stdout.splitlines()[-1] == "torch imported: False"
