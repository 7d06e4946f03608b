"""The TensorRT engine cache's keys, sidecars and rebuild/refuse decisions (plain Python, no GPU).

The engine bytes here are an opaque payload: the cache never looks inside them, TensorRT does
(tests/test_gpu_engines.py builds real ones where a GPU is present)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from patchline.runtime.config import ConfigError, TensorRtConfig, load_config
from patchline.runtime.engine_cache import (
    EngineError,
    EngineKey,
    cache_directory,
    engine_problem,
    ensure_engine,
    sidecar,
)

KEY = EngineKey(onnx_sha256="ab" * 32, precision="fp16", batch_profile=(1, 1, 8), tensorrt="10.3.0",
                compute_capability="8.7", gpu="Orin")


class Builder:
    """Counts builds; each build yields different bytes, as real rebuilds may."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> tuple[bytes, dict[str, object]]:
        self.calls += 1
        return f"plan {self.calls}".encode() * 100, {"build_seconds": 0.1}


def test_file_name_names_every_key_field() -> None:
    assert KEY.file_name == "abababababababab_fp16_b1-1-8_sm87-orin_trt10.3.0.engine"
    assert replace(KEY, compute_capability="9.0", gpu="NVIDIA H200").file_name.endswith("_sm90-h200_trt10.3.0.engine")
    with_calibration = replace(KEY, precision="int8", calibration_sha256="cd" * 32)
    assert with_calibration.file_name.endswith("_trt10.3.0_calcdcdcdcdcdcd.engine")
    variants = [replace(KEY, **change) for change in (
        {"onnx_sha256": "ef" * 32}, {"precision": "fp32"}, {"batch_profile": (1, 4, 8)}, {"tensorrt": "10.7.0"},
        {"compute_capability": "9.0"}, {"gpu": "NVIDIA GeForce RTX 3090"})]
    assert len({k.file_name for k in [KEY, *variants]}) == 7
    assert EngineKey.from_json(json.loads(json.dumps(KEY.to_json()))) == KEY


def test_builds_once_then_reuses(tmp_path) -> None:
    build = Builder()
    path, built = ensure_engine(tmp_path, KEY, True, build)
    assert (path, built, build.calls) == (tmp_path / KEY.file_name, True, 1)
    meta = json.loads(sidecar(path).read_text())
    assert meta["key"] == KEY.to_json() and meta["build_seconds"] == 0.1 and len(meta["engine_sha256"]) == 64
    assert ensure_engine(tmp_path, KEY, True, build) == (path, False)
    assert ensure_engine(tmp_path, KEY, False, build) == (path, False)
    assert build.calls == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, sidecar(path).name, path.stem + ".lock"])


def test_missing_engine_is_refused_when_building_is_disabled(tmp_path) -> None:
    with pytest.raises(EngineError, match="no engine has been built for it yet.*building is disabled.*patchline engine"):
        ensure_engine(tmp_path, KEY, False, Builder())


@pytest.mark.parametrize("change,problem", [
    ({"compute_capability": "9.0", "gpu": "NVIDIA H200"},
     "it was built for GPU compute capability 9.0 (this box needs 8.7); GPU model NVIDIA H200 (this box needs Orin)"),
    ({"gpu": "Orin Nano"}, "it was built for GPU model Orin Nano (this box needs Orin)"),  # same architecture
])
def test_foreign_engine_is_detected_and_rebuilt(tmp_path, change, problem) -> None:
    """An engine copied in from a box with another GPU, under this key's name, is not trusted."""
    other_box = tmp_path / "other"
    other_box.mkdir()
    foreign, _ = ensure_engine(other_box, replace(KEY, **change), True, Builder())
    here = tmp_path / "here"
    here.mkdir()
    shutil.copy(foreign, here / KEY.file_name)
    shutil.copy(sidecar(foreign), sidecar(here / KEY.file_name))
    assert engine_problem(here / KEY.file_name, KEY) == problem
    with pytest.raises(EngineError, match=problem.split("(")[0]):
        ensure_engine(here, KEY, False, Builder())
    build = Builder()
    assert ensure_engine(here, KEY, True, build) == (here / KEY.file_name, True)
    assert engine_problem(here / KEY.file_name, KEY) is None and build.calls == 1


def test_engine_from_before_the_gpu_model_was_in_the_key_is_rebuilt(tmp_path) -> None:
    path, _ = ensure_engine(tmp_path, KEY, True, Builder())
    meta = json.loads(sidecar(path).read_text())
    del meta["key"]["gpu"]
    sidecar(path).write_text(json.dumps(meta))
    assert "is unreadable" in engine_problem(path, KEY)
    assert ensure_engine(tmp_path, KEY, True, Builder()) == (path, True)


def test_corrupted_or_unexplained_engine_is_rebuilt(tmp_path) -> None:
    path, _ = ensure_engine(tmp_path, KEY, True, Builder())
    path.write_bytes(path.read_bytes()[:-10])  # a copy cut short
    assert "no longer match the checksum" in engine_problem(path, KEY)
    build = Builder()
    assert ensure_engine(tmp_path, KEY, True, build) == (path, True)
    sidecar(path).unlink()
    assert "is missing, so where the engine came from is unknown" in engine_problem(path, KEY)
    sidecar(path).write_text("{not json")
    assert "is unreadable" in engine_problem(path, KEY)
    ensure_engine(tmp_path, KEY, True, build)
    assert engine_problem(path, KEY) is None and build.calls == 2


def test_tensorrt_upgrade_rebuilds_and_removes_the_old_engine(tmp_path) -> None:
    old, _ = ensure_engine(tmp_path, KEY, True, Builder())
    other_model, _ = ensure_engine(tmp_path, replace(KEY, onnx_sha256="ef" * 32), True, Builder())
    stray = tmp_path / "someone_elses.engine"
    stray.write_bytes(b"not ours")
    upgraded = replace(KEY, tensorrt="10.7.0")
    new, built = ensure_engine(tmp_path, upgraded, True, Builder())
    assert built and new != old
    assert not old.exists() and not sidecar(old).exists()
    assert other_model.exists() and stray.exists()  # other models and unexplained files are left alone


def test_cache_directory_follows_systemd_then_xdg(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CACHE_DIRECTORY", f"{tmp_path / 'systemd'}:{tmp_path / 'second'}")
    assert cache_directory() == tmp_path / "systemd" and (tmp_path / "systemd").is_dir()
    assert cache_directory(tmp_path / "configured") == tmp_path / "configured"
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_directory() == tmp_path / "xdg" / "patchline"
    (tmp_path / "file").write_text("")
    with pytest.raises(EngineError, match="cannot create the engine cache directory"):
        cache_directory(tmp_path / "file" / "engines")


def test_tensorrt_config_section() -> None:
    config = load_config(None, ["tensorrt.precision=fp32", "tensorrt.batch_profile=[1, 2, 4]"])
    assert config.tensorrt == TensorRtConfig(precision="fp32", batch_profile=(1, 2, 4))
    with pytest.raises(ConfigError, match="tensorrt.batch_profile"):
        load_config(None, ["tensorrt.batch_profile=[4, 2, 8]"])
    with pytest.raises(ConfigError, match="tensorrt.precision"):
        load_config(None, ["tensorrt.precision=int4"])


def test_tensorrt_paths_in_a_config_file_are_relative_to_it(tmp_path, monkeypatch) -> None:
    """Under systemd the working directory is /: a relative calibration_cache must not resolve against it."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "line.yaml").write_text("tensorrt: {calibration_cache: int8.cache, cache_dir: engines}\n")
    monkeypatch.chdir("/")
    settings = load_config(folder / "line.yaml").tensorrt
    assert (settings.calibration_cache, settings.cache_dir) == (str(folder / "int8.cache"), str(folder / "engines"))
    absolute = load_config(folder / "line.yaml", [f"tensorrt.cache_dir={tmp_path / 'elsewhere'}"]).tensorrt
    assert absolute.cache_dir == str(tmp_path / "elsewhere")
    given = load_config(folder / "line.yaml", ["tensorrt.calibration_cache=here.cache"]).tensorrt
    assert given.calibration_cache == "here.cache"  # --set: relative to the shell's working directory, as typed
