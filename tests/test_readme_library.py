"""The README's library example runs as written, on a small model and a short loop."""

import json
import re

import numpy as np
import torch
from conftest import REPO
from torch import nn
from typer.testing import CliRunner

from smoothprof.cli import app


def test_library_example_runs(tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use it as a library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    torch.manual_seed(0)
    x = torch.randn(256, 5)
    y = (x[:, 0] + x[:, 1] ** 2 > 0.5).long()
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))
    namespace = {
        "model": model,
        "loss_fn": lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        "batches": batches[:2],
        "probe_batches": batches[:2],
        "loader": batches * 5,  # 40 steps: probes at 0, 10, 20, 30
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.5),
    }
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["result"].converged
    assert namespace["trajectory"].num_probes == 4
    assert namespace["fit"].num_points == 4
    assert namespace["analysis"].fit == namespace["fit"]  # the same points, the same fit
    assert "torch.optim.SGD" in capsys.readouterr().out
    # Its file holds the training rows: `smoothprof compare` (and `plot`) read it.
    train = namespace["trajectory"].train
    assert train["step"].tolist() == list(range(40)) and np.all(train["lr"] == 0.5)
    for command in (["compare", "traj.h5"], ["plot", "traj.h5"], ["compare", "--json", "traj.h5"]):
        result = CliRunner().invoke(app, command, env={"COLUMNS": "100"})
        assert result.exit_code == 0, result.output
    [run] = json.loads(result.stdout)["runs"]
    assert run["steps"] == 40 and run["lr"] == 0.1 and run["steps_to_target"] > 0
