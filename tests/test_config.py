from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlp.config import Config, load_config, to_dict
from vlp.config.io import suggest_key
from vlp.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("path", PRETRAIN, ids=[p.stem for p in PRETRAIN])
def test_every_pretrain_preset_loads(path: Path) -> None:
    config = load_config(path)
    assert config.name == yaml.safe_load(path.read_text()).get("name", path.stem)
    assert config.model.name


def test_every_preset_has_a_tiny_twin() -> None:
    for folder in ("models", "pretrain", "finetune"):
        names = {p.stem for p in (ROOT / "configs" / folder).glob("*.yaml")}
        for name in names:
            if not name.endswith("_tiny"):
                assert f"{name}_tiny" in names, f"configs/{folder}/{name}.yaml has no _tiny twin"


def test_unknown_key_suggests_segment_match() -> None:
    with pytest.raises(ConfigError, match=r"optim\.lr_rate.*did you mean 'optim\.lr'"):
        load_config(ROOT / "configs/pretrain/demo_tiny.yaml", ["optim.lr_rate=0.1"])
    assert suggest_key("lr_rate", ["lr", "weight_decay", "base_batch_size"]) == "lr"
    assert suggest_key("batchsize", ["batch_size", "num_workers"]) == "batch_size"


def test_unknown_key_in_yaml_names_the_full_path(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train: {max_stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"train\.max_stepz.*train\.max_steps"):
        load_config(path)


def test_wrong_type_names_key_and_type() -> None:
    with pytest.raises(ConfigError, match=r"'train\.max_steps' expects int"):
        load_config({"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match=r"'train\.progress' expects bool"):
        load_config({"train": {"progress": "yes please"}})


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=-1", "optim.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("model.fusion.num_heads=5", "model.fusion.num_heads"),
        ("eval.k_test=0", "eval.k_test"),
        ("train.precision=fp8", "train.precision"),
    ],
)
def test_impossible_values_fail_naming_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs/pretrain/demo_tiny.yaml", [override])


def test_overrides_apply_and_parse_yaml_scalars() -> None:
    config = load_config(ROOT / "configs/pretrain/demo_tiny.yaml",
                         ["optim.lr=3e-4", "train.precision=bf16", "data.crop_scale=[0.3, 1.0]"])
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.train.precision == "bf16"
    assert config.data.crop_scale == (0.3, 1.0)


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    config = load_config(ROOT / "configs/pretrain/albef_4m.yaml")
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    again = load_config(path)
    assert again == config
    assert isinstance(again, Config)


def test_no_code_is_evaluated(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_override_creates_a_section_missing_from_the_yaml() -> None:
    config = load_config(ROOT / "configs/pretrain/demo_tiny.yaml", ["objective.mlm_weight=1.0"])
    assert config.objective.mlm_weight == 1.0


def test_duplicate_yaml_key_names_the_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\noptim:\n  lr: 0.1\ntrain: {max_steps: 3}\noptim:\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: duplicate key 'optim' at line 5 \(first at line 2\)"):
        load_config(path)
    path.write_text("optim: {lr: 0.1, weight_decay: 0.0, lr: 0.2}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' at line 1"):
        load_config(path)
    # a merge key is not a duplicate: the explicit key overrides the merged one, as YAML means it
    from vlp.config.io import _read_yaml

    path.write_text("x: &b {lr: 0.1, eps: 1.0e-8}\noptim:\n  <<: *b\n  lr: 0.2\n")
    assert _read_yaml(path)["optim"] == {"lr": 0.2, "eps": 1.0e-8}


def test_objective_itm_weight_follows_the_model() -> None:
    """A dual encoder needs no objective section: an ITM weight the config leaves out is 0 without fusion."""
    tiny = {"image": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
            "text": {"width": 32, "depth": 1, "num_heads": 2, "max_length": 16}}
    config = load_config({"model": {**tiny, "fusion": {"type": "none"}}})
    assert config.objective.itm_weight == 0.0
    assert load_config({"model": tiny}).objective.itm_weight == 0.0  # fusion none is the default
    assert load_config({"model": {**tiny, "itm_head": False, "fusion": {"type": "dual_stream", "depth": 1,
                                                                         "num_heads": 2}}}).objective.itm_weight == 0.0
    fused = load_config({"model": {**tiny, "fusion": {"type": "dual_stream", "depth": 1, "num_heads": 2}}})
    assert fused.objective.itm_weight == 1.0
    # a weight the config does set is kept, and checked
    assert load_config({"model": tiny, "objective": {"itm_weight": 0.0}}).objective.itm_weight == 0.0
    with pytest.raises(ConfigError, match=r"'objective\.itm_weight' = 1\.0: ITM needs a fusion block"):
        load_config({"model": tiny}, ["objective.itm_weight=1"])
