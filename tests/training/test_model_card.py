"""The model card is written from the measured figures, and what was written by hand below its marker stays."""
import json
import shutil
from pathlib import Path

from training.evaluate import HAND, main

MODELS = "models"


def test_rewriting_the_card_keeps_the_hand_written_part_and_the_measured_figures(tmp_path):
    for name in ("eval.json", "training.json"):
        shutil.copy(f"{MODELS}/{name}", tmp_path / name)
    (tmp_path / "README.md").write_text(f"# an old card\n\nold figures\n\n{HAND}\n## Notes\n\nwhy it fails\n")
    main([str(tmp_path), "--card-only"])
    card = (tmp_path / "README.md").read_text()
    assert "old figures" not in card and card.endswith(f"{HAND}\n## Notes\n\nwhy it fails\n")
    command = json.loads((tmp_path / "training.json").read_text())["command"]
    assert "| position |" in card and f"`{command}`" in card  # from eval.json and training.json
    (tmp_path / "README.md").unlink()
    main([str(tmp_path), "--card-only"])
    assert HAND not in (tmp_path / "README.md").read_text()


def test_the_shipped_card_is_what_its_figures_and_notes_give(tmp_path):
    shutil.copytree(MODELS, tmp_path / "models", ignore=shutil.ignore_patterns("target", "drafter-*"))
    main([str(tmp_path / "models"), "--card-only"])
    assert (tmp_path / "models" / "README.md").read_text() == Path(MODELS, "README.md").read_text()
