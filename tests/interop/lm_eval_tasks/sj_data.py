"""Datasets of the test tasks: the jsonl files beside this module (no download)."""
import os

from sparsejax.interop.lm_eval_model import jsonl_dataset

HERE = os.path.dirname(os.path.abspath(__file__))


def choice(**_):
    return jsonl_dataset(os.path.join(HERE, "sj_choice.jsonl"))


def text(**_):
    return jsonl_dataset(os.path.join(HERE, "sj_text.jsonl"))


def complete(**_):
    return jsonl_dataset(os.path.join(HERE, "sj_complete.jsonl"))
