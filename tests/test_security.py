"""Nothing from a file runs code: crafted pickles, remote-code model directories and YAML tags are refused.

Every payload here is live: the tests first show that a plain unpickler / importer would run it (it touches a
marker file), then that vlp refuses the file with one clear line and the marker never appears.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from vlp.cli.main import main
from vlp.config import load_config
from vlp.config.schema import ImageEncoderConfig, TextEncoderConfig
from vlp.data.tokenizers import load_tokenizer, word_tokenizer
from vlp.encoders.hf import build_hf
from vlp.encoders.timm_encoder import build_timm, read_weights
from vlp.errors import ConfigError, UserError
from vlp.models import VLPModel, build_model
from vlp.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/pretrain/demo_tiny.yaml"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; a second thread only spins on a busy machine
    yield
    torch.set_num_threads(before)


class Payload:
    """Unpickling this runs ``touch <marker>`` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _crafted(path: Path, marker: Path, wrap: Any = None) -> Path:
    """A torch.save file whose pickle runs the payload; proven live with a plain (unsafe) torch.load."""
    torch.save(wrap(Payload(marker)) if wrap else {"step": 3, "rng": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()
    marker.unlink()
    return path


def test_crafted_trainer_state_is_refused_not_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker, run = tmp_path / "pwned", tmp_path / "run"
    config = load_config(DEMO)
    model = build_model(config.model)
    step = run / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    model.save_pretrained(step)
    _crafted(step / "trainer_state.pt", marker)
    (step / ckpt.COMPLETE_MARKER).write_text("ok\n")
    code = main(["pretrain", str(DEMO), "--output-dir", str(run), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and not marker.exists()
    assert err == (f"vlp: error: {step / 'trainer_state.pt'}: refused: it holds a pickled object (posix.system), not "
                   "only tensors and plain values; vlp never unpickles code, so this file was not written by vlp or "
                   "was altered")
    with pytest.raises(UserError, match=r"pickled object \(posix.system\)"):
        ckpt.load_trainer_state(step / "trainer_state.pt")
    assert not marker.exists()


def test_pickled_bytes_posing_as_safetensors_are_not_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    model = build_model(load_config(DEMO).model)
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UserError, match=r"model.safetensors: cannot read weights"):
        VLPModel.from_pretrained(tmp_path / "ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_crafted_encoder_weights_are_refused(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    evil = _crafted(tmp_path / f"weights{suffix}", marker, wrap=lambda p: {"state_dict": {"w": p}})
    message = rf"refused weights file .*weights\{suffix}: it holds a pickled object \(posix.system\)"
    with pytest.raises(UserError, match=message):
        read_weights(str(evil))  # the reader of timm and open_clip weights
    cfg = ImageEncoderConfig(type="timm", name="vit_tiny_patch16_224", weights=str(evil), image_size=32,
                             options={"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2})
    with pytest.raises(UserError, match=message):
        build_timm(cfg)
    assert not marker.exists()


def _tiny_bert_dir(directory: Path) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=40, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    return directory


def test_crafted_hf_pytorch_model_bin_is_refused(tmp_path: Path) -> None:
    marker, directory = tmp_path / "pwned", _tiny_bert_dir(tmp_path / "bert")
    (directory / "model.safetensors").unlink()
    _crafted(directory / "pytorch_model.bin", marker, wrap=lambda p: {"embeddings.word_embeddings.weight": p})
    cfg = TextEncoderConfig(type="hf", name=str(directory), max_length=16)
    with pytest.raises(UserError, match=r"refused: the weights in .*bert hold a pickled object \(posix.system\)"):
        build_hf(cfg, word_tokenizer(["a", "b"]))
    assert not marker.exists()


def _remote_code_dir(directory: Path, marker: Path) -> Path:
    """A model + tokenizer directory whose config asks transformers to import its own evil.py."""
    _tiny_bert_dir(directory)
    config = json.loads((directory / "config.json").read_text())
    # an unknown model_type: with a known one transformers falls back to its own class and ignores evil.py
    config.update(model_type="evilbert", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (directory / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                       "from transformers import BertConfig as EvilConfig, BertModel as EvilModel\n"
                                       "from transformers import BertTokenizerFast as EvilTokenizer\n")
    return directory


def test_remote_code_model_and_tokenizer_dirs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    directory = _remote_code_dir(tmp_path / "remote", marker)
    # a terminal on stdin would make transformers ask "run the custom code? [y/N]"; vlp must not ask
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers prompted for remote code"))
    with pytest.raises(UserError, match=r"refused: .*remote needs its own Python code"):
        build_hf(TextEncoderConfig(type="hf", name=str(directory), max_length=16), word_tokenizer(["a"]))
    with pytest.raises(UserError, match=r"refused: tokenizer .*remote needs its own Python code"):
        load_tokenizer(str(directory))
    # a config cannot switch it on either: the keyword is vlp's, a duplicate is an error
    cfg = TextEncoderConfig(type="hf", name=str(directory), max_length=16, options={"trust_remote_code": True})
    with pytest.raises(UserError):
        build_hf(cfg, word_tokenizer(["a"]))
    assert not marker.exists()


def test_yaml_python_tags_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(f"name: {tag}")  # what vlp uses everywhere
    (tmp_path / "evil.yaml").write_text(f"name: {tag}\n")
    with pytest.raises(ConfigError, match=r"evil.yaml: line 1 is not valid YAML \(could not determine a constructor .*python/object"):
        load_config(tmp_path / "evil.yaml")
    (tmp_path / "preset.yaml").write_text(f"model: {{name: {tag}}}\n")
    (tmp_path / "run.yaml").write_text("model: preset.yaml\n")
    with pytest.raises(ConfigError, match=r"preset.yaml: line 1 is not valid YAML"):
        load_config(tmp_path / "run.yaml")
    config = load_config(DEMO, [f"name={tag}"])  # a --set value is parsed safely; a tag stays a plain string
    assert config.name == tag
    checkpoint = tmp_path / "ckpt"
    build_model(config.model).save_pretrained(checkpoint)
    text = (checkpoint / "config.yaml").read_text()
    (checkpoint / "config.yaml").write_text(text.replace("format_version: 1", f"format_version: {tag}"))
    with pytest.raises(UserError, match="ckpt/config.yaml: not valid YAML"):
        VLPModel.from_pretrained(checkpoint)
    assert not marker.exists()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt")
    build_model(load_config(DEMO).model).save_pretrained(directory)
    return directory


def _edited(source: Path, target: Path, edit: Any) -> Path:
    import shutil

    shutil.copytree(source, target)
    data = yaml.safe_load((target / "config.yaml").read_text())
    edit(data["model"])
    (target / "config.yaml").write_text(yaml.safe_dump(data))
    return target


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["image"].update(type="resnet9000"), r"unknown image encoder 'resnet9000'; known: open_clip, timm, vit"),
    (lambda m: m["text"].update(type="lstm"), r"unknown text encoder 'lstm'"),
    (lambda m: m["fusion"].update(type="triple_stream"), r"unknown fusion 'triple_stream'"),
    (lambda m: m.update(contrastive="triplet"), r"'model.contrastive' = 'triplet': expected one of itc, siglip"),
    (lambda m: m["fusion"].update(num_heads=3), r"'model.fusion.num_heads' = 3: fusion width 32 is not divisible"),
    (lambda m: m.update(widht=3), r"unknown config key 'model.widht'"),
])
def test_checkpoint_naming_unknown_parts_fails_cleanly(checkpoint_dir: Path, tmp_path: Path, edit: Any,
                                                       message: str) -> None:
    with pytest.raises(UserError, match=message):
        VLPModel.from_pretrained(_edited(checkpoint_dir, tmp_path / "c", edit))


def test_weights_that_disagree_with_the_config_name_the_tensors(checkpoint_dir: Path, tmp_path: Path) -> None:
    wider = _edited(checkpoint_dir, tmp_path / "wide", lambda m: m.update(embed_dim=24))
    with pytest.raises(UserError) as info:
        VLPModel.from_pretrained(wider)
    text = str(info.value)
    assert "\n" not in text and "tensor shapes do not match the config (file vs model)" in text
    assert "image_proj.weight [16, 32] vs [24, 32]" in text and "text_proj.weight [16, 32] vs [24, 32]" in text
    deeper = _edited(checkpoint_dir, tmp_path / "deep", lambda m: m["fusion"].update(depth=2))
    with pytest.raises(UserError, match=r"weights do not match the config: missing fusion\.text_layers\.1\.attn"
                                        r"\.k\.bias, .* \(\+20 more\)$"):
        VLPModel.from_pretrained(deeper)
