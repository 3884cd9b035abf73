"""Shared test set-up: a project-local model store, no tracking, no model hub."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("BENTOML_HOME", str(ROOT / ".bentoml"))
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"
