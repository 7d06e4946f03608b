"""The `patchline` command end to end, as a user runs it (subprocesses, real files)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SMALL_OVERRIDES, export_python, patchline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cli_artifact(sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "artifact"
    sets = [arg for o in SMALL_OVERRIDES for arg in ("--set", o)]
    result = patchline("export", "--images", str(sample_data), "--out", str(out), "--quiet",
                       "--config", str(ROOT / "configs" / "default.yaml"), *sets, python=export_python())
    summary = json.loads(result.stdout)
    assert summary["images_used"] == 20 and summary["images_skipped"] == 0
    assert summary["bank"] == [2048, 192]
    assert "coreset" in summary["timings_s"]
    return out


def test_score_prints_json_lines_and_writes_heatmaps(cli_artifact, sample_data, tmp_path):
    result = patchline("score", "--artifact", str(cli_artifact), "--device", "cpu",
                       "--heatmap-dir", str(tmp_path / "maps"), str(sample_data / "test"))
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 6 + 3 * 3
    for line in lines:
        assert set(line["latency_ms"]) == {"preprocess", "backbone", "distance", "reweight", "map", "total"}
        x, y = line["max_patch_xy"]
        assert 0 <= x < 128 and 0 <= y < 128
        assert Path(line["heatmap"]).is_file()
    # every class folder has a 000.png: one heatmap per image, named by its place below the argument
    maps = tmp_path / "maps"
    assert len({line["heatmap"] for line in lines}) == len(lines) == len(list(maps.rglob("*_heatmap.png")))
    assert (maps / "good" / "000_heatmap.png").is_file() and (maps / "spot" / "000_heatmap.png").is_file()
    good = [l["score"] for l in lines if "/good/" in l["path"]]
    bad = [l["score"] for l in lines if "/good/" not in l["path"]]
    assert np.mean(bad) > np.mean(good)


def test_score_reports_unreadable_images_and_exits_nonzero(cli_artifact, sample_data, tmp_path):
    from tests.hostile import lying_png

    (tmp_path / "a-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "b-lying.png").write_bytes(lying_png())  # 69 bytes declaring 50000x50000 (OpenCV 5 asserts on it)
    (tmp_path / "c-good.png").write_bytes((sample_data / "test" / "good" / "000.png").read_bytes())
    result = patchline("score", "--artifact", str(cli_artifact), str(tmp_path), check=False)
    assert result.returncode == 1
    broken, lying, good = (json.loads(line) for line in result.stdout.splitlines())
    assert broken["error"].startswith("PNG header cut short")
    assert lying["error"] == "its PNG header declares 50000x50000 pixels, more than the limit of 100000000 (max_pixels)"
    assert good["path"].endswith("c-good.png") and good["score"] > 0  # the files after a bad one are scored
    result = patchline("score", "--artifact", str(cli_artifact), "--max-pixels", "100", str(tmp_path / "c-good.png"),
                       check=False)
    assert result.returncode == 1 and "128x128 pixels, more than the limit of 100" in result.stdout


def test_bad_config_and_artifact_refuse_with_a_clear_message(tmp_path, sample_data):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scoring:\n  neighbours: 3\n")
    result = patchline("export", "--config", str(bad), "--images", str(sample_data), "--out", str(tmp_path / "o"),
                       check=False)
    assert result.returncode != 0 and "scoring.neighbours: unknown key" in result.stderr
    result = patchline("score", "--artifact", str(tmp_path), str(bad), check=False)
    assert result.returncode != 0 and "missing manifest.json" in result.stderr


def test_score_with_a_run_config_scores_as_that_camera(cli_artifact, sample_data, tmp_path):
    """`--config /etc/patchline/<camera>.yaml`: the camera's artifact and settings, without repeating them."""
    run = tmp_path / "cam1.yaml"
    run.write_text(json.dumps({"camera": "cam1", "artifact": str(cli_artifact), "device": "cpu",
                               "source": {"kind": "folder", "path": str(tmp_path)}}))
    image = str(sample_data / "test" / "good" / "000.png")
    by_config = json.loads(patchline("score", "--config", str(run), image).stdout)
    by_options = json.loads(patchline("score", "--artifact", str(cli_artifact), "--device", "cpu", image).stdout)
    assert by_config["score"] == by_options["score"] > 0


def test_eval_prints_table_and_auroc(cli_artifact, sample_data, tmp_path):
    pytest.importorskip("sklearn")  # the calibration extra: not in the runtime-only venv
    result = patchline("eval", "--artifact", str(cli_artifact), "--data", str(sample_data),
                       "--report", str(tmp_path / "report"))
    line = next(line for line in result.stdout.splitlines() if line.startswith("image AUROC"))
    auroc = float(line.split()[2])
    assert 0.8 < auroc <= 1.0  # random weights: well above chance, not perfect
    assert "test/spot/000.png" in result.stdout


def test_runtime_scoring_never_imports_torch(cli_artifact, sample_data):
    code = f"""
import sys
from patchline.runtime.cli import main
from patchline.runtime.inspector import Inspector
from patchline.runtime.preprocess import read_image, list_images
inspector = Inspector({str(cli_artifact)!r}, device="cpu")
for path in list_images({str(sample_data / "test")!r})[:2]:
    inspector.inspect(read_image(path))
main(["score", "--artifact", {str(cli_artifact)!r}, {str(sample_data / "test" / "good")!r}])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torchvision"))
assert not heavy, heavy
print("clean")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("clean")


def test_non_editable_install_imports_and_runs(tmp_path, cli_artifact, sample_data):
    """`pip install .` (a real wheel, not the editable checkout) gives a working CLI."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, timeout=300, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # Dependencies come from the test environment's site-packages (also those it reaches through a .pth file,
    # as a venv layered on a shared one does); patchline itself only from the wheel.
    deps = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    wheel = next(wheels.glob("patchline-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    python = str(venv / "bin" / "python")
    where = subprocess.run([python, "-c", "import patchline.runtime as r; print(r.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, check=True).stdout.strip()
    assert where.startswith(str(site)), where
    result = patchline("score", "--artifact", str(cli_artifact), str(sample_data / "test" / "good" / "000.png"),
                       python=python, cwd=tmp_path)
    assert "score" in json.loads(result.stdout)
    assert (site / "patchline" / "runtime" / "cli.py").is_file()
    assert (site / "patchline" / "runtime" / "tools" / "broker.py").is_file()  # the subpackage is listed
    assert (site / "patchline" / "runtime" / "search" / "kernels" / "euclidean_topk.cu").is_file()  # package data
    assert os.path.isdir(site / "patchline" / "export") and os.path.isdir(site / "patchline" / "calibration")


def test_verbose_refusal_logs_the_traceback(tmp_path, caplog):
    from patchline.runtime.artifact import ArtifactError
    from patchline.runtime.cli import main

    caplog.set_level(logging.DEBUG, logger="patchline")
    with pytest.raises(SystemExit, match="missing manifest.json"):
        main(["-v", "score", "--artifact", str(tmp_path), str(tmp_path / "x.png")])
    failed = [r for r in caplog.records if r.getMessage() == "score failed"]
    assert len(failed) == 1 and failed[0].exc_info[0] is ArtifactError


@pytest.mark.parametrize("command,extra,module", [
    (["backbones"], "export", "patchline.export.catalogue"),
    (["import-anomalib", "model.ckpt", "--out", "artifact"], "export", "patchline.export.anomalib_import"),
    (["quantize", "--artifact", "artifact", "--images", "images"], "calibration", "patchline.calibration.quantize"),
])
def test_a_missing_extra_ends_the_command_with_the_install_that_brings_it(command, extra, module, monkeypatch):
    from patchline.runtime.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # as if its extra were not installed: importing it fails
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert str(exit_info.value) == (f"patchline: this command needs the '{extra}' extra ({module} is not installed): "
                                    f"pip install 'patchline[{extra}]'")
