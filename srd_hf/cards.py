"""Card templates live in the repository's ``hub_cards/`` folder (one place to edit them)."""

from __future__ import annotations

from pathlib import Path

CARDS_DIR = Path(__file__).resolve().parent.parent / "hub_cards"


def load_card_template(name: str) -> str:
    path = CARDS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"card template {name!r} not found in {CARDS_DIR}; install srd-hf from its source tree (pip install -e .)"
        )
    return path.read_text()
