"""Card templates ship inside the package (``srd_hf/hub_cards/``), one place to edit them.

They are read with :mod:`importlib.resources` rather than a path next to the source tree, so a
plain ``pip install`` (wheel, not editable) writes the same cards after training as a clone.
"""

from __future__ import annotations

from importlib import resources

#: the card templates shipped with the package
CARD_TEMPLATES = ("backdoored_model.md", "clean_model.md", "srd_policy.md")


def _cards_dir():
    return resources.files("srd_hf") / "hub_cards"


def load_card_template(name: str) -> str:
    """The text of the card template ``name`` (a ``str.format`` template)."""
    path = _cards_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"card template {name!r} is not in the installed srd_hf package (srd_hf/hub_cards/); "
            f"shipped templates: {list(CARD_TEMPLATES)}"
        )
    return path.read_text(encoding="utf-8")
