"""`smoothprof report`: valid PNG files and one self-contained HTML page, or a one-line error."""

import base64
import json
import re
import sys

import pytest
from conftest import ASSETS
from typer.testing import CliRunner

from smoothprof.cli import app
from smoothprof.report import MISSING_MATPLOTLIB

pytestmark = pytest.mark.usefixtures("clean_sys_path")
runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    env = {"COLUMNS": "100"}
    return runner.invoke(app, [str(a) for a in args], env=env)


def one_line_error(result, pattern):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "minimal.h5"
    result = invoke(
        "run", ASSETS / "good_minimal.py", "-o", out, "--steps", "30", "--probe-every", "3"
    )
    assert result.exit_code == 0, result.output
    return out


def assert_valid_png(path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    pixels = matplotlib_image.imread(path)  # decodes the whole image
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 0  # not a blank canvas
    return data


def test_report_writes_pngs_and_a_self_contained_page(trajectory, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    backend = matplotlib.get_backend()
    out = tmp_path / "report"
    result = invoke("report", trajectory, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'report.html'}" in result.stdout
    smoothness = assert_valid_png(out / "smoothness.png")
    series = assert_valid_png(out / "series.png")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # Both figures inlined, byte for byte; nothing fetched from anywhere else.
    sources = re.findall(r'src="([^"]*)"', page)
    assert [base64.b64decode(s.split(",", 1)[1]) for s in sources] == [smoothness, series]
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"https?://|href=|<link|<script|@import|url\(", page, re.IGNORECASE)
    for text in ("L0", "L1", "Spearman log-log", "Headline", "torch.optim.SGD", "Figure 1"):
        assert text in page
    fit = json.loads(invoke("fit", trajectory, "--json").stdout)
    assert len(fit["sweep_lrs"]) == 3  # the search's best and neighbours: its sweep is on the page
    assert f"--lr {fit['sweep_lrs'][-1]:.3g} --probe-every 0" in page
    prefix = "lr" if fit["clip_threshold"] is None else "clip_lr"  # --no-clip or --clip c
    assert f"smoothprof compare {prefix}*.h5" in page
    assert matplotlib.get_backend() == backend  # drawing changed no global matplotlib state


def test_report_default_directory_and_options(trajectory, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    result = invoke("report", trajectory, "--estimator", "fd", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "minimal_report"
    assert sorted(p.name for p in folder.iterdir()) == [
        "report.html",
        "series.png",
        "smoothness.png",
    ]
    assert "finite difference along the update" in (folder / "report.html").read_text()
    again = invoke("report", trajectory, "--skip-steps", "3")  # replaces the earlier report
    assert again.exit_code == 0, again.output


def test_report_errors_are_one_line(trajectory, tmp_path):
    pytest.importorskip("matplotlib")
    one_line_error(invoke("report", tmp_path / "missing.h5"), "no such file")
    one_line_error(invoke("report", trajectory, "--skip-steps", "1000"), "leaves 0 probe")
    no_probes = tmp_path / "none.h5"
    made = invoke("run", ASSETS / "good_minimal.py", "-o", no_probes, "--steps", "3",
                  "--probe-every", "0")  # fmt: skip
    assert made.exit_code == 0, made.output
    one_line_error(invoke("report", no_probes, "-o", tmp_path / "r"), "no smoothness")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    one_line_error(invoke("report", trajectory, "-o", blocked), "report directory|not a directory")


def test_without_matplotlib_the_error_names_the_extra(trajectory, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    result = invoke("report", trajectory, "-o", tmp_path / "r")
    one_line_error(result, re.escape("pip install 'smoothprof[science]'"))
    assert MISSING_MATPLOTLIB in result.stderr
    assert not (tmp_path / "r").exists()
