"""Per-layer runs end to end: the groups/ section of the file, the per-group fit, and the
commands that show it; and that a default run is unchanged."""

import json
import math
import re

import h5py
import numpy as np
import pytest
from conftest import ASSETS
from typer.testing import CliRunner

from smoothprof.cli import app
from smoothprof.fit import FitError
from smoothprof.per_layer import analyze_per_layer
from smoothprof.recommend import group_clip, pytorch_group_snippet
from smoothprof.trajectory import (
    LAYER_COLUMNS,
    PROBE_COLUMNS,
    TrajectoryError,
    TrajectoryWriter,
    read_trajectory,
)

pytestmark = pytest.mark.usefixtures("clean_sys_path")
runner = CliRunner()
MODEL = ASSETS / "good_per_layer.py"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "100"})


@pytest.fixture(scope="module")
def per_layer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("per_layer") / "run.h5"
    result = invoke("run", MODEL, "--per-layer", "-o", path)
    assert result.exit_code == 0, result.output
    assert "per-layer: 2 parameter groups: hidden (72), rest (21)" in result.output
    assert re.search(r"per-layer: [\d.]+ of them for 2 groups", result.output)
    return path


def test_per_layer_run_writes_groups_beside_the_unchanged_probe_columns(per_layer_file):
    trajectory = read_trajectory(per_layer_file)
    layer = trajectory.groups
    assert layer.names == ("hidden", "rest")
    assert layer.patterns == (("embed.*", "body.*"), ("*",))
    assert layer.parameters[1] == ("head.weight", "head.bias")
    assert layer.sizes == (4 * 6 + 6 + 6 * 6 + 6, 6 * 3 + 3)
    assert trajectory.config["per_layer"] is True
    num_probes = trajectory.num_probes
    assert num_probes == 8
    assert len(layer.columns["step"]) == 2 * num_probes
    for name in layer.names:
        steps, values = layer.series(name, "hessian_norm")
        assert np.array_equal(steps, trajectory.probes["step"])
        assert np.all(values <= trajectory.probes["hessian_norm"] * (1 + 2e-3))  # interlacing
        _, grads = layer.series(name, "grad_norm")
        assert np.all(grads <= trajectory.probes["grad_norm"] * (1 + 1e-9))
    with h5py.File(per_layer_file, "r") as handle:  # a reader that knows only probes/ and train/
        assert handle.attrs["format_version"] == 1
        assert sorted(handle["probes"]) == sorted(PROBE_COLUMNS)
        assert sorted(handle["groups"]) == sorted(LAYER_COLUMNS)


def test_a_default_run_has_no_groups_section_even_with_groups_in_the_defaults(tmp_path):
    path = tmp_path / "plain.h5"
    result = invoke("run", MODEL, "-o", path)
    assert result.exit_code == 0, result.output
    assert "per-layer" not in result.output
    with h5py.File(path, "r") as handle:
        assert sorted(handle) == ["probes", "train"]
    assert read_trajectory(path).groups is None
    assert read_trajectory(path).config["per_layer"] is False


def test_fit_per_layer_ranks_the_groups_and_prints_per_group_clipping(per_layer_file):
    result = invoke("fit", per_layer_file, "--per-layer", "--bootstrap", "20")
    assert result.exit_code == 0, result.output
    assert "per-layer: where the sharpness sits" in result.output
    assert "clip_grad_norm_" in result.output and "measured, not proved" in result.output
    assert "per-layer envelopes" in result.output
    document = json.loads(invoke("fit", per_layer_file, "--per-layer", "--json").output)
    groups = document["per_layer"]["groups"]
    assert {g["name"] for g in groups} == {"hidden", "rest"}
    shares = [g["sharpness_share"] for g in groups]
    assert shares == sorted(shares, reverse=True) and all(0 < s <= 1.002 for s in shares)
    assert sum(g["largest_at_probes"] for g in groups) == document["per_layer"]["num_probes"]
    for group in groups:
        if group["L1"]:
            assert math.isclose(group["clip_threshold"], group["L0"] / group["L1"])
    snippet = document["per_layer"]["snippet"]
    compile(snippet, "snippet", "exec")
    assert "'hidden': (['embed.*', 'body.*']" in snippet and "'rest': (['*']" in snippet
    assert "per_layer" not in json.loads(invoke("fit", per_layer_file, "--json").output)


def test_plot_of_a_per_layer_file_shows_each_groups_sharpness_and_envelope(per_layer_file):
    result = invoke("plot", per_layer_file)
    assert result.exit_code == 0, result.output
    assert "per-layer sharpness" in result.output
    assert "per-layer envelopes" in result.output
    assert "hidden" in result.output


def test_fit_per_layer_on_a_file_without_groups_is_one_line_and_exit_1(tmp_path):
    path = tmp_path / "plain.h5"
    assert invoke("run", MODEL, "-o", path, "--steps", "12").exit_code == 0
    result = invoke("fit", path, "--per-layer")
    assert result.exit_code == 1
    assert "no per-layer measurements" in result.output and "--per-layer" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--per-layer", "--groups", "x=nothing*"], 1, "match no trainable parameter"),
        (["--groups", "x=head.*"], 2, "add --per-layer"),
        (["--per-layer", "--estimators", "fd"], 2, "add hvp to estimators"),
    ],
)
def test_per_layer_option_mistakes_are_one_line(tmp_path, args, code, message):
    result = invoke("run", MODEL, "-o", tmp_path / "x.h5", *args)
    assert result.exit_code == code, result.output
    assert message in " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())
    assert "Traceback" not in result.output


def test_the_writer_refuses_group_rows_it_has_no_layout_for(tmp_path):
    row = {"step": 0, "loss": 1.0, "grad_norm": 1.0, "smoothness_fd": math.nan,
           "hessian_norm": 2.0, "groups": [{"group": "a", "hessian_norm": 1.0}]}  # fmt: skip
    with TrajectoryWriter(tmp_path / "t.h5") as writer, pytest.raises(TrajectoryError):
        writer.append_probe(row)
    layout = [{"name": "a", "patterns": ["a*"], "parameters": ["a1"], "size": 3}]
    with TrajectoryWriter(tmp_path / "u.h5", groups=layout) as writer:
        writer.append_probe(row)
        with pytest.raises(TrajectoryError, match="not one of the writer's"):
            writer.append_probe({**row, "step": 1, "groups": [{"group": "b"}]})
    layer = read_trajectory(tmp_path / "u.h5").groups
    assert layer.names == ("a",) and layer.columns["hessian_norm"].tolist() == [1.0]


def _synthetic(tmp_path, name="s.h5"):
    """A per-layer file where block "sharp" holds nearly all of the sharpness and grows with its
    gradient norm as 1 + 3 g, while "flat" stays at 0.01 whatever its gradient."""
    layout = [
        {"name": "flat", "patterns": ["flat.*"], "parameters": ["flat.w"], "size": 5},
        {"name": "sharp", "patterns": ["sharp.*"], "parameters": ["sharp.w"], "size": 7},
    ]
    path = tmp_path / name
    rng = np.random.default_rng(0)
    with TrajectoryWriter(path, groups=layout, attributes={"config": {"lr": 0.1}}) as writer:
        for step in range(25):
            g = float(np.exp(rng.uniform(-2, 2)))
            sharp = 1 + 3 * g * rng.uniform(0.8, 1.0)
            groups = [
                {"group": "flat", "grad_norm": 0.5, "hessian_norm": 0.01, "hessian_eig": -0.01,
                 "hvp_count": 3, "hessian_converged": True},
                {"group": "sharp", "grad_norm": g, "hessian_norm": sharp, "hessian_eig": sharp,
                 "hvp_count": 5, "hessian_converged": True},
            ]  # fmt: skip
            writer.append_probe({"step": step, "loss": 1.0, "grad_norm": g + 0.5,
                                 "smoothness_fd": math.nan, "hessian_norm": sharp * 1.0005,
                                 "groups": groups})  # fmt: skip
    return path


def test_the_dominant_group_ranks_first_and_gets_its_own_clip(tmp_path):
    analysis = analyze_per_layer(_synthetic(tmp_path), bootstrap=0, lr=0.2)
    first, second = analysis.groups
    assert (first.name, second.name) == ("sharp", "flat")
    assert first.sharpness_share > 0.99 and second.sharpness_share < 0.01
    assert first.largest_at == 25 and second.largest_at == 0
    assert first.fit.L1 > 2 and first.clip.clip_threshold == first.fit.L0 / first.fit.L1
    assert second.fit.L1 == 0 and second.clip.clip_threshold is None  # plain smoothness
    assert analysis.order == ("flat", "sharp") and not analysis.warnings
    assert "lr=0.2" in analysis.snippet()


def test_a_block_above_the_whole_hessian_is_reported_as_a_missed_certificate(tmp_path):
    path = tmp_path / "v.h5"
    layout = [{"name": "a", "patterns": ["*"], "parameters": ["w"], "size": 2}]
    with TrajectoryWriter(path, groups=layout) as writer:
        for step in range(4):
            block = {"group": "a", "grad_norm": 1.0 + step, "hessian_norm": 2.0 + step}
            writer.append_probe({"step": step, "loss": 1.0, "grad_norm": 1.0 + step,
                                 "smoothness_fd": math.nan,
                                 "hessian_norm": 1.5 + step if step == 2 else 2.0 + step,
                                 "groups": [block]})  # fmt: skip
    analysis = analyze_per_layer(path, bootstrap=0)
    assert len(analysis.warnings) == 1 and "at step 2" in analysis.warnings[0]


def test_files_with_different_groups_are_not_fitted_together(tmp_path):
    other = tmp_path / "o.h5"
    layout = [{"name": "x", "patterns": ["*"], "parameters": ["w"], "size": 1}]
    with TrajectoryWriter(other, groups=layout) as writer:
        writer.append_probe({"step": 0, "loss": 1.0, "grad_norm": 1.0, "smoothness_fd": 1.0,
                             "hessian_norm": 1.0})  # fmt: skip
    with pytest.raises(FitError, match="differ"):
        analyze_per_layer([_synthetic(tmp_path), other])


def test_group_clip_without_a_fit_or_a_slope_suggests_none():
    assert group_clip("g", None).clip_threshold is None
    snippet = pytorch_group_snippet([("g", ("g.*",), None)])
    assert "# optimizer = torch.optim.SGD(param_groups, lr=...)" in snippet
    compile(snippet, "snippet", "exec")


def test_a_clipped_profile_caps_every_group_clip_at_its_own(tmp_path):
    path = _synthetic(tmp_path)
    free = analyze_per_layer(path, bootstrap=0).group("sharp").clip.clip_threshold
    capped = analyze_per_layer(path, bootstrap=0, profile_clip=free / 2).group("sharp").clip
    assert capped.clip_threshold == free / 2 and "capped" in capped.note
    loose = analyze_per_layer(path, bootstrap=0, profile_clip=free * 2).group("sharp").clip
    assert loose.clip_threshold == free


def test_report_of_a_per_layer_run_has_its_figure_and_section(per_layer_file, tmp_path):
    pytest.importorskip("matplotlib")
    directory = tmp_path / "report"
    result = invoke("report", per_layer_file, "-o", directory, "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    assert (directory / "per_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (directory / "report.html").read_text()
    assert "Per layer: where the sharpness sits" in page and "clip_grad_norm_" in page
    plain = tmp_path / "plain.h5"
    assert invoke("run", MODEL, "-o", plain, "--steps", "12").exit_code == 0
    assert invoke("report", plain, "-o", directory, "--bootstrap", "0").exit_code == 0
    assert not (directory / "per_layer.png").exists()  # the earlier report's figure is gone
    assert "Per layer" not in (directory / "report.html").read_text()
