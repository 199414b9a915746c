"""Datasets of the experiments' local tasks: the jsonl files beside this module (no download)."""
import os

from sparsejax.interop.lm_eval_model import jsonl_dataset

HERE = os.path.dirname(os.path.abspath(__file__))


def next_line(**_):
    return jsonl_dataset(os.path.join(HERE, "sj_next_line.jsonl"))


def next_token(**_):
    return jsonl_dataset(os.path.join(HERE, "sj_next_token.jsonl"))
