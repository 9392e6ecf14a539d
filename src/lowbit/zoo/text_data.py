"""Offline evaluation text: WordNet noun synsets (Debian ``wordnet-base``) or Python's bundled pydoc topics.

WordNet reverse-dictionary retrieval: a query is a synset's gloss, its document the synset's lemma list
("dog, domestic dog, Canis familiaris"). N synsets with a gloss longer than 20 characters are sampled with a fixed
seed; calibration text comes from other synsets, disjoint from the evaluation ones. WordNet is © Princeton
University, distributed under its permissive WordNet licence (see /usr/share/doc/wordnet-base/copyright).

Example:
    >>> from lowbit.zoo.text_data import parse_synset_line
    >>> line = "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a member of the genus Canis"
    >>> parse_synset_line(line)
    ('dog, domestic dog, Canis familiaris', 'a member of the genus Canis')
"""

from __future__ import annotations

import os
import subprocess
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

MIN_GLOSS = 20
_warned = False


def parse_synset_line(line: str) -> tuple[str, str] | None:
    """``(lemmas, gloss)`` of one ``data.noun`` line, or None for licence/header lines."""
    if not line[:1].isdigit() or " | " not in line:
        return None
    head, gloss = line.split(" | ", 1)
    f = head.split()
    w_cnt = int(f[3], 16)
    lemmas = [w.replace("_", " ") for w in f[4 : 4 + 2 * w_cnt : 2]]
    return ", ".join(lemmas), gloss.strip()


def find_wordnet() -> Path | None:
    """Path of WordNet's ``data.noun``: ``$LOWBIT_WORDNET_DIR``, then ``dpkg -L wordnet-base``, then the usual place."""
    env = os.environ.get("LOWBIT_WORDNET_DIR")
    candidates = [Path(env) / "data.noun"] if env else []
    try:
        out = subprocess.run(["dpkg", "-L", "wordnet-base"], capture_output=True, text=True, timeout=10, check=False)
        candidates += [Path(p) for p in out.stdout.splitlines() if p.endswith("/data.noun")]
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append(Path("/usr/share/wordnet/data.noun"))
    return next((p for p in candidates if p.is_file()), None)


@lru_cache(maxsize=2)
def wordnet_synsets(path: str) -> list[tuple[str, str]]:
    """Every ``(lemmas, gloss)`` with a gloss longer than 20 characters."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parsed = parse_synset_line(line)
            if parsed and len(parsed[1]) > MIN_GLOSS:
                out.append(parsed)
    return out


def wordnet_split(n_eval: int, n_calib: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[str]] | None:
    """``(eval pairs, calibration glosses)`` sampled without overlap, or None when WordNet is not installed."""
    path = find_wordnet()
    if path is None:
        return None
    synsets = wordnet_synsets(str(path))
    order = np.random.default_rng(seed).permutation(len(synsets))
    evals = [synsets[i] for i in order[:n_eval]]
    calib = [synsets[i][1] for i in order[n_eval : n_eval + n_calib]]
    return evals, calib


def pydoc_paragraphs(min_chars: int = 80) -> list[str]:
    """Paragraphs of Python's bundled ``pydoc_data`` help topics (always available)."""
    from pydoc_data.topics import topics

    paras = []
    for text in topics.values():
        for p in text.split("\n\n"):
            p = " ".join(p.split())
            if len(p) >= min_chars:
                paras.append(p)
    return paras


def pydoc_split(n_eval: int, n_calib: int, seed: int = 0) -> tuple[list[str], list[str]]:
    paras = pydoc_paragraphs()
    order = np.random.default_rng(seed).permutation(len(paras))
    return [paras[i] for i in order[:n_eval]], [paras[i] for i in order[n_eval : n_eval + n_calib]]


def warn_no_wordnet() -> None:
    global _warned
    if not _warned:
        warnings.warn(
            "WordNet (Debian package wordnet-base) not found: MiniLM is evaluated by fidelity (cosine to "
            "fp32) on pydoc text only; install it with 'apt-get install wordnet-base'",
            stacklevel=3,
        )
        _warned = True
