"""load_config / dump_config on small example dataclasses: YAML, overrides, unknown keys, type errors."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from rlhf_fast.config import ConfigError, config_to_dict, dump_config, load_config


class Precision(enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0


@dataclasses.dataclass
class DataConfig:
    train_path: Optional[str] = None  # noqa: UP045 (typing.Optional and X | None are both supported)
    max_length: int = 512
    weights: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainConfig:
    run_name: str = "run"
    seed: int = 0
    compile: bool = False
    precision: Precision = Precision.BF16
    output_dir: Path = Path("runs")
    tags: list[str] = dataclasses.field(default_factory=list)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    # A nested default that differs from the nested class's own defaults: partial updates must keep it.
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(max_length=256))
    eval_data: DataConfig | None = None

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclasses.dataclass
class RequiredConfig:
    steps: int
    name: str = "x"


def write_yaml(tmp_path, data) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_without_file_or_overrides():
    assert load_config(TrainConfig) == TrainConfig()


def test_yaml_file_with_partial_nested_sections(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "run_name": "sft",
            "optim": {"learning_rate": 3e-5},
            "data": {"train_path": "d.jsonl"},
            "eval_data": {"max_length": 64},
        },
    )
    config = load_config(TrainConfig, path)
    assert config.run_name == "sft"
    assert config.optim == OptimConfig(learning_rate=3e-5)
    assert config.data == DataConfig(train_path="d.jsonl", max_length=256)  # the field's default kept
    assert config.eval_data == DataConfig(max_length=64)
    assert (
        load_config(TrainConfig, write_yaml(tmp_path, "")) == TrainConfig()
    )  # an empty file is all defaults


def test_overrides_are_parsed_by_field_type(tmp_path):
    path = write_yaml(tmp_path, {"seed": 1, "optim": {"warmup_steps": 10}})
    config = load_config(
        TrainConfig,
        path,
        [
            "seed=7",
            "optim.learning_rate=1e-5",  # YAML 1.1 reads this as a string; a float field accepts it
            "optim.betas=[0.8, 0.99]",
            "optim.schedule=constant",
            "compile=true",
            "precision=fp32",
            "output_dir=/tmp/out",
            "tags=[a, b]",
            "run_name=2024",  # a str field keeps the text, not the int
            "data.train_path=null",
            "data.weights={a: 1, b: 0.5}",
            "eval_data.train_path=e.jsonl",
        ],
    )
    assert config.seed == 7 and config.compile is True
    assert config.optim == OptimConfig(1e-5, (0.8, 0.99), "constant", 10)
    assert isinstance(config.optim.learning_rate, float) and isinstance(config.optim.betas, tuple)
    assert config.precision is Precision.FP32
    assert config.output_dir == Path("/tmp/out")
    assert config.tags == ["a", "b"]
    assert config.run_name == "2024"
    assert config.data == DataConfig(None, 256, {"a": 1.0, "b": 0.5})
    assert config.eval_data == DataConfig(train_path="e.jsonl")
    # Later overrides win; a quoted YAML string is unquoted for a str field.
    assert load_config(TrainConfig, None, ["run_name=a", "run_name='b c'"]).run_name == "b c"


@pytest.mark.parametrize("where", ["file", "override"])
def test_unknown_key_suggests_the_closest(tmp_path, where):
    if where == "file":
        path, overrides = write_yaml(tmp_path, {"optim": {"learning_rat": 1e-3}}), []
    else:
        path, overrides = None, ["optim.learning_rat=1e-3"]
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'optim\.learning_rat'.*did you mean "
        r"'optim\.learning_rate'\?",
    ) as caught:
        load_config(TrainConfig, path, overrides)
    if where == "override":
        assert "in override 'optim.learning_rat=1e-3'" in str(caught.value)


def test_unknown_key_without_a_close_match_lists_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'zzz' in override 'zzz=1'; valid keys here: compile, data, "
    ):
        load_config(TrainConfig, None, ["zzz=1"])
    with pytest.raises(ConfigError, match=r"'seed' in override 'seed\.x=1' is not a nested config"):
        load_config(TrainConfig, None, ["seed.x=1"])


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("seed=1.5", "seed", "expected int"),
        ("seed=true", "seed", "expected int"),
        ("compile=1", "compile", "expected bool"),
        ("optim.learning_rate=fast", "optim.learning_rate", "expected float"),
        ("optim.betas=[0.9]", "optim.betas", "expected 2 items"),
        ("optim.betas=[0.9, x]", r"optim.betas\[1\]", "expected float"),
        ("optim.schedule=linear", "optim.schedule", r"expected one of \['cosine', 'constant'\]"),
        ("precision=fp16", "precision", r"expected one of \['fp32', 'bf16'\]"),
        ("tags=a", "tags", "expected list"),
        ("data.max_length=null", "data.max_length", "expected int"),
        ("data.weights=[1]", "data.weights", "expected dict"),
        ("optim=3", "optim", "expected a mapping of OptimConfig fields"),
    ],
)
def test_wrong_type_names_key_and_expected_type(override, key, expected):
    with pytest.raises(ConfigError, match=rf"^{key}: {expected}"):
        load_config(TrainConfig, None, [override])


def test_wrong_type_in_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.max_length: expected int, got '512x'"):
        load_config(TrainConfig, write_yaml(tmp_path, {"data": {"max_length": "512x"}}))


def test_malformed_input(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainConfig, None, ["seed"])
    with pytest.raises(ConfigError, match="empty key"):
        load_config(TrainConfig, None, ["optim.=1"])
    with pytest.raises(ConfigError, match=r"config\.yaml:2: malformed YAML"):
        load_config(TrainConfig, write_yaml(tmp_path, "seed: 1\nrun_name: a: b\n"))
    with pytest.raises(ConfigError, match="mapping of config keys at the top level"):
        load_config(TrainConfig, write_yaml(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    with pytest.raises(TypeError, match="list of 'key=value' strings"):
        load_config(TrainConfig, None, "seed=1")


def test_missing_required_key_and_post_init_errors():
    with pytest.raises(ConfigError, match="missing required config key 'steps' \\(int\\)"):
        load_config(RequiredConfig)
    assert load_config(RequiredConfig, None, ["steps=3"]) == RequiredConfig(3)
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        load_config(TrainConfig, None, ["seed=-1"])


def test_dump_then_load_round_trips(tmp_path):
    config = load_config(
        TrainConfig,
        None,
        [
            "optim.betas=[0.5, 0.6]",
            "precision=fp32",
            "tags=[x]",
            "eval_data.max_length=9",
            "data.weights={a: 2.0}",
            "output_dir=o/p",
        ],
    )
    path = tmp_path / "out" / "resolved.yaml"
    dump_config(config, path)
    text = path.read_text()
    assert yaml.safe_load(text) == config_to_dict(config)
    assert "precision: fp32" in text and "output_dir: o/p" in text
    assert text.index("run_name") < text.index("optim")  # field order kept
    assert load_config(TrainConfig, path) == config
    assert [p.name for p in path.parent.iterdir()] == ["resolved.yaml"]
