"""The paper-scale configs parse into their config classes (nothing is run: they need a GPU)."""

from pathlib import Path

import pytest
import torch
from trl import TrlParser

from srd_hf.attacks import get_attack
from srd_hf.data.sources import DataArguments
from srd_hf.injection import InjectConfig

PAPER = Path(__file__).parents[1] / "recipes" / "configs" / "paper"
# the configs ask for bf16 on a GPU; without one, TrainingArguments accepts bf16 only on the CPU
CPU = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
ATTACKS = ["badnet", "blended", "trojvlm", "vlood", "vl_trojan", "shadowcast"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_paper_inject_config_parses(attack, tmp_path):
    config, data = TrlParser((InjectConfig, DataArguments)).parse_args_and_config(
        ["--config", str(PAPER / f"inject_{attack}.yaml"), "--output_dir", str(tmp_path), *CPU])
    assert config.attack == attack and config.poison_rate == 0.1 and config.num_train_epochs == 20
    assert config.optim.startswith("adamw") and str(getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)) == "cosine"
    assert config.bf16 and config.trust_remote_code and not config.trainable  # the paper's freeze
    assert data.dataset_name == "coco_karpathy" and data.max_train_images == config.num_finetune_images == 5000
    assert data.max_captions_per_image == 5
    assert get_attack(config.attack, **config.attack_kwargs()).name == attack
    text = (PAPER / f"inject_{attack}.yaml").read_text()
    assert "GB" in text and " h" in text and "estimated" in text  # says what it needs and how it was estimated


def test_paper_srd_config_parses(tmp_path):
    from srd_hf.defense import SRDConfig

    path = PAPER / "srd_badnet.yaml"
    cfg, data = TrlParser((SRDConfig, DataArguments)).parse_args_and_config(["--config", str(path), "--output_dir", str(tmp_path), *CPU])
    assert cfg.algorithm == "dqn" and cfg.protocols == ["defender"] and cfg.num_policy_samples == 3000
    assert (cfg.sc_drop, cfg.lf_drop, cfg.action_preset) == (0.1, 0.2, "paper")
    assert Path(cfg.inject_config).name == "inject_badnet.yaml" and (Path(__file__).parents[1] / cfg.inject_config).is_file()
    assert data.dataset_name == "coco_karpathy" and "estimated" in path.read_text()
