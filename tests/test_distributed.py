"""Data-parallel runs: torchrun with 2 CPU processes (gloo) against one process.

Each test launches ``python -m torch.distributed.run --standalone`` (a free port, no clash with
other runs) as a subprocess with one thread per rank, so it also proves the commands of
docs/distributed.md.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ASSETS, REPO
from typer.testing import CliRunner

from smoothprof.cli import app
from smoothprof.distributed import Communicator, ShardedLoader, shard_dataloader
from smoothprof.trajectory import read_trajectory

PROBE_VALUES = (
    "loss",
    "grad_norm",
    "grad_noise",
    "grad_curvature",
    "smoothness_fd",
    "hessian_norm",
    "hessian_eig",
)
RTOL = 1e-5  # float32 round-off of sums taken in another order (measured: about 2e-7)


def torchrun(nproc, *args, cwd, timeout=120):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "NO_COLOR": "1",
        "COLUMNS": "100",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(nproc), *map(str, args)]
    # A session of its own: on a timeout (ranks out of step wait forever) the launcher and its
    # ranks are killed together.
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"torchrun {' '.join(map(str, args))} hung for {timeout} s")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def assert_close(a, b, rtol=RTOL):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape
    assert np.allclose(a, b, rtol=rtol, atol=0, equal_nan=True), (a, b)


def test_readme_loop_in_two_processes_measures_what_one_process_does(tmp_path):
    """docs/distributed.md's DDP loop with the Probe: 2 ranks equal 1 rank, rank 0 writes."""
    runs = {}
    for nproc in (1, 2):
        cwd = tmp_path / f"n{nproc}"
        cwd.mkdir()
        done = torchrun(nproc, ASSETS / "ddp_readme_loop.py", cwd=cwd)
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in cwd.iterdir()) == ["result.json", "traj.h5"]
        runs[nproc] = (
            read_trajectory(cwd / "traj.h5"),
            json.loads((cwd / "result.json").read_text()),
        )
    (one, one_result), (two, two_result) = runs[1], runs[2]
    assert two.attributes["world_size"] == 2 and one.attributes["world_size"] == 1
    assert list(two.probes["step"]) == list(one.probes["step"]) == [0, 10, 20]
    for column in PROBE_VALUES:
        assert_close(two.probes[column], one.probes[column])
    assert np.isfinite(two.probes["smoothness_fd"]).all()
    assert two.probes["hessian_converged"].all()
    # hessian_norm on one batch (rank 1 evaluates none) and on three (ranks 2 and 1)
    for name in ("one_batch", "all_batches"):
        assert_close(two_result[name][:2], one_result[name][:2])
        assert two_result[name][3]
    assert two_result["ranks_agree"]


def test_ranks_that_would_decide_differently_stay_in_step(tmp_path):
    """An HVP method failing on rank 1 only is dropped on both; rank 0's clock decides the cap.
    Without either agreement the ranks wait for each other forever (checked by removing it)."""
    done = torchrun(
        2, ASSETS / "ddp_agreement.py", tmp_path / "seen.json", cwd=tmp_path, timeout=90
    )
    assert done.returncode == 0, done.stderr
    rank0, rank1 = json.loads((tmp_path / "seen.json").read_text())
    assert rank0 == rank1
    assert rank0["method"] == "forward-over-reverse"  # double-backward failed on rank 1
    assert rank0["steps"] == [0] and rank0["skipped"] == 5  # rank 0 trains fast: over the cap


MODEL = """
import torch
from torch import nn

def model():
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3),
                         nn.Linear(16, 3))

def dataloader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16,
                                       shuffle=True)
"""
OPTIONS = ("--steps", "10", "--lr", "0.2", "--optimizer", "momentum", "--clip", "1")
OPTIONS += ("--probe-batches", "3", "--max-overhead", "inf", "--device", "cpu")
# Both launches compute alike: no timed choice of the HVP method, Lanczos to round-off.
OPTIONS += ("--hvp-method", "double-backward", "--rtol", "1e-9")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """The same 2-process run with probes every 3 steps and without probes."""
    root = tmp_path_factory.mktemp("ddp_cli")
    (root / "noisy.py").write_text(MODEL)
    runs = {}
    for name, every in (("probed", "3"), ("plain", "0")):
        cwd = root / name
        cwd.mkdir()
        done = torchrun(
            2, "-m", "smoothprof", "run", root / "noisy.py", "-o", "traj.h5",
            "--save-model", "final.pt", "--probe-every", every, *OPTIONS, cwd=cwd,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        runs[name] = (cwd, done)
    return root, runs


def test_probes_leave_two_process_training_unchanged(two_process_runs):
    _, runs = two_process_runs
    (probed_dir, _), (plain_dir, _) = runs["probed"], runs["plain"]
    probed, plain = read_trajectory(probed_dir / "traj.h5"), read_trajectory(plain_dir / "traj.h5")
    assert probed.num_probes == 4 and plain.num_probes == 0
    assert np.array_equal(probed.train["loss"], plain.train["loss"])
    assert np.array_equal(probed.train["grad_norm"], plain.train["grad_norm"])
    probed_state = torch.load(probed_dir / "final.pt")
    plain_state = torch.load(plain_dir / "final.pt")
    assert list(probed_state) == list(plain_state)  # the module's names, not DDP's "module."
    assert not any(name.startswith("module.") for name in probed_state)
    for name in probed_state:
        assert torch.equal(probed_state[name], plain_state[name]), name


def test_only_rank0_writes_and_the_file_records_the_world_size(two_process_runs):
    _, runs = two_process_runs
    cwd, done = runs["probed"]
    assert sorted(p.name for p in cwd.iterdir()) == ["final.pt", "traj.h5"]
    trajectory = read_trajectory(cwd / "traj.h5")
    assert trajectory.attributes["world_size"] == 2
    assert trajectory.config["world_size"] == 2
    assert trajectory.status == "closed" and len(trajectory.train["step"]) == 10
    assert done.stdout.count("wrote traj.h5") == 1
    assert "2 processes (gloo)" in done.stderr
    assert sum(line.startswith("smoothprof ") for line in done.stderr.splitlines()) == 1
    assert "error" not in done.stderr.lower()


def test_two_process_cli_probe_equals_one_process_at_the_same_parameters(
    two_process_runs, clean_sys_path
):
    """Step 0 measures at the same initialization on the same global probe batches."""
    root, runs = two_process_runs
    out = root / "one.h5"
    result = CliRunner().invoke(
        app,
        ["run", str(root / "noisy.py"), "-o", str(out), "--probe-every", "3", *OPTIONS],
        env={"COLUMNS": "100"},
    )
    assert result.exit_code == 0, result.output
    one = read_trajectory(out)
    two = read_trajectory(runs["probed"][0] / "traj.h5")
    assert one.attributes["world_size"] == 1 and one.config["world_size"] == 1
    for column in PROBE_VALUES:
        if column != "smoothness_fd":  # measured along each run's own update
            assert_close(two.probes[column][0], one.probes[column][0])


@pytest.mark.parametrize(
    "asset", ["broken_syntax.py", "broken_loss_not_tensor.py"]
)  # found before the process group starts, and by every rank after it
def test_a_broken_model_file_under_torchrun_exits_1_with_one_line(tmp_path, asset):
    done = torchrun(
        2, "-m", "smoothprof", "run", ASSETS / asset, "-o", "x.h5", "--device", "cpu",
        cwd=tmp_path, timeout=90,
    )  # fmt: skip
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert asset in errors[0]
    assert not (tmp_path / "x.h5").exists()
    assert done.stdout == ""


def _fake_comm(rank):
    return Communicator(None, rank, 2, "gloo")


def test_a_map_style_dataloader_gets_a_distributed_sampler():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True)
    shards = [shard_dataloader(loader, _fake_comm(rank), seed=0) for rank in (0, 1)]
    passes = []
    for _ in range(2):
        seen = [torch.cat([b[0] for b in shard]).tolist() for shard in shards]
        assert sorted(seen[0] + seen[1]) == list(range(10))  # disjoint, complete
        passes.append(seen)
    assert passes[0] != passes[1]  # set_epoch: another shuffle on the next pass


def test_other_iterables_are_strided_whatever_the_model_draws():
    def shuffled_batches():
        order = torch.randperm(12)  # the global RNG, as many shuffling loaders use it
        return [order[i : i + 2] for i in range(0, 12, 2)]

    class Loader:
        def __iter__(self):
            return iter(shuffled_batches())

    seen = []
    for rank in (0, 1):
        torch.manual_seed(rank)  # the ranks' global RNGs differ: the shards must not
        shard = ShardedLoader(Loader(), _fake_comm(rank), seed=0)
        batches = []
        for batch in shard:
            torch.rand(rank + 1)  # e.g. dropout draws between batches
            batches.append(batch)
        assert len(batches) == 3
        seen.append(torch.cat(batches).tolist())
    assert sorted(seen[0] + seen[1]) == list(range(12))


def test_the_fit_suggests_its_sweep_under_torchrun_for_a_data_parallel_profile():
    from smoothprof.display import sweep_commands
    from smoothprof.fit import fit_envelope
    from smoothprof.recommend import ProfilingRun, recommend

    fit = fit_envelope([0.2, 0.5, 1.0, 2.0], [1.2, 1.5, 2.0, 3.0], num_bootstrap=0)
    recs = recommend(fit, profile=ProfilingRun(lr=1))
    commands = sweep_commands("model.py", recs, world_size=4)
    assert commands[0].startswith("torchrun --nproc_per_node 4 -m smoothprof run model.py --clip")
    assert commands[-1] == "smoothprof compare clip_lr*.h5"
    assert sweep_commands("model.py", recs)[0].startswith("smoothprof run model.py")
