from pathlib import Path

import pytest

from patchline.export.config import load_export_config
from patchline.runtime.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_default_yaml_is_the_anomalib_default():
    config = load_export_config(ROOT / "configs" / "default.yaml")
    assert config == load_export_config(None)
    assert config.model.backbone == "wide_resnet50_2"
    assert config.model.layers == ["layer2", "layer3"]
    assert config.preprocess.image_size == (256, 256)
    assert config.coreset.ratio == 0.1
    assert config.scoring.num_neighbors == 9


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "line.yaml"
    path.write_text("model:\n  backbon: resnet18\n")
    with pytest.raises(ConfigError) as err:
        load_export_config(path)
    assert str(err.value) == f"{path}: invalid configuration: model.backbon: unknown key, did you mean backbone?"


def test_every_problem_on_one_line_with_keys_as_written(tmp_path):
    """One journal line per refusal; a source's key without pydantic's union member name; the known keys when no
    name is close."""
    path = tmp_path / "line.yaml"
    path.write_text("camera: cam1\nartifact: /a\nmqtt: {hots: broker}\nthreads: 0\nzzz: 1\n"
                    "source: {kind: folder, path: /tmp, pol_interval_s: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, model=RunConfig)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: invalid configuration: ")
    problems = set(text.split(": invalid configuration: ")[1].split("; "))
    assert problems == {"mqtt.hots: unknown key, did you mean host?",
                        "source.pol_interval_s: unknown key, did you mean poll_interval_s?",
                        "threads: Input should be greater than or equal to 1",
                        f"zzz: unknown key (known here: {', '.join(RunConfig.model_fields)})"}


def test_bad_value_names_key_and_reason(tmp_path):
    path = tmp_path / "line.yaml"
    path.write_text("coreset:\n  ratio: 1.5\n")
    with pytest.raises(ConfigError, match=r"coreset.ratio: Input should be less than or equal to 1"):
        load_export_config(path)


def test_bad_weights_and_image_size(tmp_path):
    with pytest.raises(ConfigError, match="model.weights"):
        load_export_config(None, ["model.weights=imagenet"])
    with pytest.raises(ConfigError, match="at least 32"):
        load_export_config(None, ["preprocess.image_size=8"])


def test_not_yaml_and_not_a_mapping(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_export_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_export_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_export_config(tmp_path / "missing.yaml")


def test_overrides_win_over_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  backbone: resnet50\n")
    config = load_export_config(path, ["model.backbone=resnet18", "preprocess.image_size=[128, 160]", "coreset.ratio=0.5"])
    assert config.model.backbone == "resnet18"
    assert config.preprocess.image_size == (128, 160)
    assert config.coreset.ratio == 0.5
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_export_config(None, ["model.backbone"])


def run_yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "line.yaml"
    path.write_text("camera: cam1\nartifact: /opt/model\nsource: {kind: folder, path: /tmp}\n" + text)
    return path


def test_run_config_has_a_tensorrt_section(tmp_path):
    from patchline.runtime.config import RunConfig

    config = load_config(run_yaml(tmp_path, "engine: tensorrt\ntensorrt: {build: false, precision: fp32}\n"),
                         model=RunConfig)
    assert config.tensorrt.build is False and config.tensorrt.precision == "fp32"
    with pytest.raises(ConfigError, match="tensorrt.bild"):
        load_config(run_yaml(tmp_path, "tensorrt: {bild: false}\n"), model=RunConfig)


def test_run_config_refuses_values_that_would_fail_later(tmp_path):
    from patchline.runtime.config import RunConfig

    path = run_yaml(tmp_path, "threshold: .nan\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, model=RunConfig)
    assert str(path) in str(err.value) and "threshold" in str(err.value) and "finite" in str(err.value)
    with pytest.raises(ConfigError, match="threshold: Input should be greater than 0"):
        load_config(run_yaml(tmp_path, "threshold: -1\n"), model=RunConfig)
    path = run_yaml(tmp_path, "").read_text().replace("path: /tmp}", "path: /tmp, reconnect_min_s: 60}")
    (tmp_path / "line.yaml").write_text(path)
    with pytest.raises(ConfigError, match=r"source: .*reconnect_min_s \(60\) is larger than reconnect_max_s \(30\)"):
        load_config(tmp_path / "line.yaml", model=RunConfig)


def test_run_config_names_engines_devices_precisions_and_distances_the_runtime_has(tmp_path):
    path = run_yaml(tmp_path, "engine: tensort\ndevice: gpu\nprecision: fp16\ndistance: gpu\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, model=RunConfig)
    problems = set(str(err.value).split(": invalid configuration: ")[1].split("; "))
    assert problems == {"engine: Input should be one of onnxruntime, tensorrt",
                        "device: Input should be one of auto, cpu, cuda, tensorrt",
                        "precision: Input should be one of fp32, int8",
                        "distance: Input should be one of cpu, cuda, cuda-fp16"}
    config = load_config(run_yaml(tmp_path, "device: tensorrt\nprecision: int8\ndistance: cuda-fp16\n"), model=RunConfig)
    assert (config.engine, config.device, config.precision, config.distance) == ("onnxruntime", "tensorrt", "int8",
                                                                                  "cuda-fp16")


def test_a_registered_engine_is_a_name_the_config_and_the_command_line_take(tmp_path, monkeypatch):
    """The names come from the registries, not from lists of their own."""
    from patchline.runtime.cli import build_parser
    from patchline.runtime.engines import ENGINES
    from patchline.runtime.search import DISTANCES

    monkeypatch.setitem(ENGINES._factories, "openvino", lambda artifact, settings: None)
    monkeypatch.setitem(DISTANCES._factories, "faiss", lambda bank, gpu, cache_dir: bank)
    config = load_config(run_yaml(tmp_path, "engine: openvino\ndistance: faiss\n"), model=RunConfig)
    assert (config.engine, config.distance) == ("openvino", "faiss")
    args = build_parser().parse_args(["score", "--engine", "openvino", "--distance", "faiss", "image.png"])
    assert (args.engine, args.distance) == ("openvino", "faiss")
