"""Every shipped gin config parses strictly and builds its objects (train --dry-run path)."""

import pathlib

import gin
import pytest

import extractors
from flowrl.agent import AgentConfig
from flowrl.cli import EXPERIMENTS_DIR, main, parse_gin
from flowrl.errors import ConfigError
from flowrl.registry import REGISTRY
from flowrl.train import train

CONFIGS = sorted(
    str(p.relative_to(EXPERIMENTS_DIR))
    for p in EXPERIMENTS_DIR.rglob("*.gin")
    if p.parent.name != "domains" and p.name != "base.gin"
)
PAPER_QAM_INV_TEMP = {  # METHODS.md §8.2, tag QAM
    "antmaze-large-navigate": 10, "antmaze-giant-navigate": 3, "humanoidmaze-medium-navigate": 3,
    "humanoidmaze-large-navigate": 3, "cube-double-play": 1, "cube-triple-play": 3,
    "cube-quadruple-play": 1, "scene-play": 1, "puzzle-3x3-play": 3, "puzzle-4x4-play": 30,
}


def build(config: str) -> dict:
    parse_gin([config], [])
    return train(None, dry_run=True)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_builds(config):
    built = build(config)
    assert isinstance(built["extractor"], tuple(REGISTRY.values()))
    assert isinstance(built["agent"], AgentConfig)
    gin.clear_config()
    # Building twice gives equal objects (construction does not mutate the config).
    again = build(config)
    assert type(again["extractor"]) is type(built["extractor"])
    assert again["env_name"] == built["env_name"]


@pytest.mark.parametrize("domain", sorted(PAPER_QAM_INV_TEMP))
def test_qam_configs_carry_the_paper_settings(domain):
    built = build(f"qam/{domain}.gin")
    extractor, agent = built["extractor"], built["agent"]
    assert isinstance(extractor, extractors.QAM)
    assert float(extractor.inv_temp) == PAPER_QAM_INV_TEMP[domain]
    assert extractor.flow_steps == 10 and agent.grad_clip_norm == 1.0 and agent.num_critics == 10
    locomotion = "maze" in domain
    assert agent.horizon == (1 if locomotion else 5)
    assert float(agent.discount) == pytest.approx(0.995 if ("giant" in domain or "humanoid" in domain) else 0.99)
    assert float(agent.rho) == (0.0 if "humanoid" in domain else 0.5)
    assert built["sparse"] == (domain in ("scene-play", "puzzle-3x3-play", "puzzle-4x4-play"))
    assert built["env_name"].startswith(domain + "-singletask-task")


def test_unknown_binding_is_one_clear_line(capsys):
    assert main(["train", "qam/scene-play.gin", "--bind", "qam.inv_tmp=3", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "inv_tmp" in err and "qam" in err


def test_unknown_name_in_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'qam/scene-play.gin'\nqamm.inv_temp = 3\n")
    assert main(["train", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "qamm" in err


def test_missing_config_file_is_a_config_error():
    with pytest.raises(ConfigError, match="not found"):
        parse_gin(["no/such/file.gin"], [])


def test_unknown_env_lists_valid_domains(capsys):
    code = main(["train", "qam/scene-play.gin", "--bind", "train.env_name='scene-plya-singletask-v0'", "--dry-run"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scene-plya" in err and "cube-double-play" in err


def test_list_prints_registered_names(capsys):
    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == sorted(REGISTRY)


def test_configs_dir_is_complete():
    names = {pathlib.Path(c).parts[0] for c in CONFIGS}
    assert {"qam", "bam"} <= names
    assert len([c for c in CONFIGS if c.startswith("qam/")]) == 10
