"""The TensorRT engine cache's keys, sidecars and rebuild/refuse decisions (plain Python, no GPU).

The engine bytes here are an opaque payload: the cache never looks inside them, TensorRT does
(tests/test_gpu_engines.py builds real ones where a GPU is present)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from patchline.runtime.cli import ENGINE_OPTIONS, SCORE_OPTIONS, _settings, build_parser, main
from patchline.runtime.config import SERVICE_CACHE_DIR, ConfigError, RunConfig, TensorRtConfig, ToolConfig, load_config
from patchline.runtime.engines.engine_cache import (
    EngineError,
    EngineKey,
    build_command,
    cache_directory,
    engine_problem,
    ensure_engine,
    sidecar,
)

KEY = EngineKey(onnx_sha256="ab" * 32, precision="fp16", batch_profile=(1, 1, 8), tensorrt="10.3.0",
                compute_capability="8.7", gpu="Orin")
FIX = "patchline engine --artifact /models/a --set tensorrt.cache_dir=/cache"


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
    path, built = ensure_engine(tmp_path, KEY, True, build, FIX)
    assert (path, built, build.calls) == (tmp_path / KEY.file_name, True, 1)
    meta = json.loads(sidecar(path).read_text())
    assert meta["key"] == KEY.to_json() and meta["build_seconds"] == 0.1 and len(meta["engine_sha256"]) == 64
    assert ensure_engine(tmp_path, KEY, True, build, FIX) == (path, False)
    assert ensure_engine(tmp_path, KEY, False, build, FIX) == (path, False)
    assert build.calls == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, sidecar(path).name, path.stem + ".lock"])


def test_missing_engine_is_refused_when_building_is_disabled(tmp_path) -> None:
    with pytest.raises(EngineError, match="no engine has been built for it yet.*building is disabled.*build it on this box "
                                          "with: patchline engine --artifact /models/a --set tensorrt.cache_dir=/cache$"):
        ensure_engine(tmp_path, KEY, False, Builder(), FIX)


@pytest.mark.parametrize("change,problem", [
    ({"compute_capability": "9.0", "gpu": "NVIDIA H200"},
     "it was built for GPU compute capability 9.0 (this box needs 8.7); GPU model NVIDIA H200 (this box needs Orin)"),
    ({"gpu": "Orin Nano"}, "it was built for GPU model Orin Nano (this box needs Orin)"),  # same architecture
])
def test_foreign_engine_is_detected_and_rebuilt(tmp_path, change, problem) -> None:
    """An engine copied in from a box with another GPU, under this key's name, is not trusted."""
    other_box = tmp_path / "other"
    other_box.mkdir()
    foreign, _ = ensure_engine(other_box, replace(KEY, **change), True, Builder(), FIX)
    here = tmp_path / "here"
    here.mkdir()
    shutil.copy(foreign, here / KEY.file_name)
    shutil.copy(sidecar(foreign), sidecar(here / KEY.file_name))
    assert engine_problem(here / KEY.file_name, KEY) == problem
    with pytest.raises(EngineError, match=problem.split("(")[0]):
        ensure_engine(here, KEY, False, Builder(), FIX)
    build = Builder()
    assert ensure_engine(here, KEY, True, build, FIX) == (here / KEY.file_name, True)
    assert engine_problem(here / KEY.file_name, KEY) is None and build.calls == 1


def test_engine_from_before_the_gpu_model_was_in_the_key_is_rebuilt(tmp_path) -> None:
    path, _ = ensure_engine(tmp_path, KEY, True, Builder(), FIX)
    meta = json.loads(sidecar(path).read_text())
    del meta["key"]["gpu"]
    sidecar(path).write_text(json.dumps(meta))
    assert "is unreadable" in engine_problem(path, KEY)
    assert ensure_engine(tmp_path, KEY, True, Builder(), FIX) == (path, True)


def test_corrupted_or_unexplained_engine_is_rebuilt(tmp_path) -> None:
    path, _ = ensure_engine(tmp_path, KEY, True, Builder(), FIX)
    path.write_bytes(path.read_bytes()[:-10])  # a copy cut short
    assert "no longer match the checksum" in engine_problem(path, KEY)
    build = Builder()
    assert ensure_engine(tmp_path, KEY, True, build, FIX) == (path, True)
    sidecar(path).unlink()
    assert "is missing, so where the engine came from is unknown" in engine_problem(path, KEY)
    sidecar(path).write_text("{not json")
    assert "is unreadable" in engine_problem(path, KEY)
    ensure_engine(tmp_path, KEY, True, build, FIX)
    assert engine_problem(path, KEY) is None and build.calls == 2


def test_tensorrt_upgrade_rebuilds_and_removes_the_old_engine(tmp_path) -> None:
    old, _ = ensure_engine(tmp_path, KEY, True, Builder(), FIX)
    other_model, _ = ensure_engine(tmp_path, replace(KEY, onnx_sha256="ef" * 32), True, Builder(), FIX)
    stray = tmp_path / "someone_elses.engine"
    stray.write_bytes(b"not ours")
    upgraded = replace(KEY, tensorrt="10.7.0")
    new, built = ensure_engine(tmp_path, upgraded, True, Builder(), FIX)
    assert built and new != old
    assert not old.exists() and not sidecar(old).exists()
    assert other_model.exists() and stray.exists()  # other models and unexplained files are left alone


def test_cache_directory_follows_the_config_then_systemd_then_xdg(tmp_path, monkeypatch) -> None:
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
    config = load_config(None, ["tensorrt.precision=fp32", "tensorrt.batch_profile=[1, 2, 4]"], ToolConfig)
    assert config.tensorrt == TensorRtConfig(precision="fp32", batch_profile=(1, 2, 4))
    with pytest.raises(ConfigError, match="tensorrt.batch_profile"):
        load_config(None, ["tensorrt.batch_profile=[4, 2, 8]"], ToolConfig)
    with pytest.raises(ConfigError, match="tensorrt.precision"):
        load_config(None, ["tensorrt.precision=int4"], ToolConfig)


def _slow_build(log: str) -> tuple[bytes, dict[str, object]]:
    with open(log, "a") as handle:  # O_APPEND: one whole line per build, whichever process
        handle.write(f"{os.getpid()}\n")
    time.sleep(1.0)  # long enough that every other process arrives while this one builds
    return b"plan" * 1000, {"build_seconds": 1.0}


def _start_camera(cache_dir: str, log: str, barrier) -> tuple[str, bool]:  # noqa: ANN001 - a multiprocessing Barrier
    barrier.wait()
    path, built = ensure_engine(Path(cache_dir), KEY, True, lambda: _slow_build(log), FIX)
    return str(path), built


def test_cameras_starting_together_build_the_shared_engine_once(tmp_path) -> None:
    """N services (separate processes) sharing the unit's CacheDirectory=patchline: one builds, the rest wait and load."""
    cameras = 4
    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(cameras)
    log = tmp_path / "builds.log"
    with context.Pool(cameras) as pool:
        results = pool.starmap(_start_camera, [(str(tmp_path), str(log), barrier)] * cameras)
    assert len(log.read_text().splitlines()) == 1
    assert {path for path, _ in results} == {str(tmp_path / KEY.file_name)}
    assert sorted(built for _, built in results) == [False] * (cameras - 1) + [True]
    assert engine_problem(tmp_path / KEY.file_name, KEY) is None


def test_build_command_rebuilds_exactly_these_settings_as_the_cache_owner(tmp_path, monkeypatch) -> None:
    settings = TensorRtConfig(precision="int8", batch_profile=(1, 2, 4), workspace_mb=512,
                              calibration_cache=str(tmp_path / "cal.cache"), cache_dir=str(tmp_path / "cache"))
    cache = cache_directory(settings.cache_dir)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    words = shlex.split(build_command(tmp_path / "model", "cuda:1", settings, cache))
    assert words[1:3] == ["engine", "--artifact"]  # this user owns the cache: no sudo
    args = build_parser().parse_args(words[1:])
    rebuilt, _ = _settings(args, ENGINE_OPTIONS)
    assert rebuilt == settings.model_copy(update={"cache_dir": str(cache)})
    assert (args.artifact, args.device) == (tmp_path / "model", "cuda:1")
    os.chown(cache, 65534, 65534)  # the service's user owns the service's cache
    owner = shlex.split(build_command(tmp_path / "model", "cuda:1", settings, cache))[:3]
    assert owner[:2] == ["sudo", "-u"] and owner[2] in ("nobody", "#65534")
    os.chown(cache, os.geteuid(), os.getegid())
    monkeypatch.setenv("INVOCATION_ID", "0123")  # the service itself: a person runs the command from a shell
    assert shlex.split(build_command(tmp_path / "model", "cuda:1", settings, cache))[:2] == ["sudo", "-u"]


RUN = {"camera": "cam1", "artifact": "/opt/patchline/models/cam1", "engine": "tensorrt", "device": "cuda",
       "source": {"kind": "folder", "path": "/srv/inbox"}, "tensorrt": {"precision": "fp32", "build": False}}


def test_run_config_engines_live_in_the_service_cache(monkeypatch) -> None:
    """The service (systemd's $CACHE_DIRECTORY), and the same run config read from a shell, use one cache."""
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/patchline")
    service = RunConfig.model_validate(RUN)
    monkeypatch.delenv("CACHE_DIRECTORY")
    shell = RunConfig.model_validate(RUN)
    assert service.tensorrt.cache_dir == shell.tensorrt.cache_dir == SERVICE_CACHE_DIR
    monkeypatch.setenv("CACHE_DIRECTORY", "/srv/engines:/second")
    assert RunConfig.model_validate(RUN).tensorrt.cache_dir == "/srv/engines"
    explicit = dict(RUN, tensorrt={"cache_dir": "/data/engines"})
    assert RunConfig.model_validate(explicit).tensorrt.cache_dir == "/data/engines"
    assert RunConfig.model_validate(dict(RUN, tensorrt={"cache_dir": None})).tensorrt.cache_dir == "/srv/engines"
    assert load_config(None, [], ToolConfig).tensorrt.cache_dir is None  # an export config: the user's own cache (below)


def test_engine_command_with_a_run_config_builds_what_the_service_loads(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    run_yaml = tmp_path / "cam1.yaml"
    run_yaml.write_text(yaml.safe_dump(RUN))
    args = build_parser().parse_args(["engine", "--config", str(run_yaml), "--check"])
    settings, run = _settings(args, ENGINE_OPTIONS)
    service = load_config(run_yaml, model=RunConfig)  # what `patchline run` (the Daemon) gets
    assert settings == service.tensorrt and settings.cache_dir == SERVICE_CACHE_DIR and not settings.build
    assert (args.artifact, args.device) == (Path(service.artifact), service.device)
    override = build_parser().parse_args(["engine", "--config", str(run_yaml), "--artifact", "/m", "--device", "cuda:1"])
    _settings(override, ENGINE_OPTIONS)
    assert (override.artifact, override.device) == (Path("/m"), "cuda:1")  # the command line wins
    score = build_parser().parse_args(["score", "--config", str(run_yaml), "x.png"])
    settings, _ = _settings(score, SCORE_OPTIONS)
    assert settings == service.tensorrt and (score.engine, score.device, score.distance) == ("tensorrt", "cuda", "cpu")
    run_yaml.write_text(yaml.safe_dump(dict(RUN, engine="onnxruntime")))
    with pytest.raises(SystemExit, match="camera cam1 runs engine 'onnxruntime', which loads no engine"):
        main(["engine", "--config", str(run_yaml)])
    with pytest.raises(SystemExit, match="give --artifact, or a run config as --config"):
        main(["engine"])


def test_tensorrt_paths_in_a_config_file_are_relative_to_it(tmp_path, monkeypatch) -> None:
    """Under systemd the working directory is /: a relative calibration_cache must not resolve against it."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "line.yaml").write_text("tensorrt: {calibration_cache: int8.cache, cache_dir: engines}\n")
    monkeypatch.chdir("/")
    settings = load_config(folder / "line.yaml", [], ToolConfig).tensorrt
    assert (settings.calibration_cache, settings.cache_dir) == (str(folder / "int8.cache"), str(folder / "engines"))
    absolute = load_config(folder / "line.yaml", [f"tensorrt.cache_dir={tmp_path / 'elsewhere'}"], ToolConfig).tensorrt
    assert absolute.cache_dir == str(tmp_path / "elsewhere")
    given = load_config(folder / "line.yaml", ["tensorrt.calibration_cache=here.cache"], ToolConfig).tensorrt
    assert given.calibration_cache == "here.cache"  # --set: relative to the shell's working directory, as typed
