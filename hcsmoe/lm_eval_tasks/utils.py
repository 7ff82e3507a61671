"""Datasets for the bundled multiple-choice tasks, read from the package so no download is needed."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

MC_DIR = Path(__file__).resolve().parent.parent / "corpora" / "multiple-choice"


def _questions(name: str) -> datasets.DatasetDict:
    """The records of one bundled JSONL file as a 'test' split; the leading canary record is skipped, not used."""
    with open(MC_DIR / f"bigbench-{name}.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    questions = [r for r in records if "canary" not in r]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(questions)})


# lm-eval calls a task's custom_dataset with the task metadata as keyword arguments; none is needed here.
def strategyqa(**metadata) -> datasets.DatasetDict:
    return _questions("strategyqa")


def social_iqa(**metadata) -> datasets.DatasetDict:
    return _questions("social_iqa")
