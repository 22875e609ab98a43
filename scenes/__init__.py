"""The synthetic image-text scenes (scenes/corpus.py): images with known content and ground-truth answers, for
the demo data (pipeline/demo_data.py), the trained model pair (training/) and the tests. PIL only."""
