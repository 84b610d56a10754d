"""The Wikipedia distillation corpus (checkpoints/make_wiki_text.py): markup stripping,
decontamination against the evaluation text, and the shipped file itself."""

from __future__ import annotations

import importlib.util
import os

import pytest

from activeflow_jax.distill.train import SHIPPED_CORPORA, distillation_texts
from activeflow_jax.errors import InvalidArgumentError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_TEXT = os.path.join(ROOT, "tests", "data", "wiki.test.lf.raw")


@pytest.fixture(scope="module")
def wiki():
    spec = importlib.util.spec_from_file_location("make_wiki_text", os.path.join(ROOT, "checkpoints", "make_wiki_text.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROSE = ("The aardvark is a medium-sized burrowing nocturnal mammal native to Africa and it is the only living "
         "species of its order.")
ARTICLE = f"""{{{{Infobox animal | name = {{{{nested | x}}}} }}}}
'''Aardvark''' is [[mammal|a mammal]] found in [[Africa]].<ref name="a">Smith, p. 3</ref> {PROSE}
[[File:Aardvark.jpg|thumb|An [[aardvark]] at night]]
{{| class="wikitable"
| cell || cell
|}}
== Behaviour ==
It feeds on ants and termites, which it digs out of their hills with its strong claws at night &amp; alone.
* a list item that is long enough to count as a paragraph if lists were kept in the text
It sleeps in a burrow during the day and comes out at dusk to walk many kilometres looking for food.<!-- c -->
== References ==
Smith, John. The aardvark book, a very long citation that would otherwise be kept as prose here.
[[Category:Mammals]]
"""


def test_markup_is_stripped_to_prose_and_section_headings(wiki):
    paragraphs = wiki.clean(ARTICLE, min_words=8)
    assert paragraphs[0] == f"Aardvark is a mammal found in Africa. {PROSE}"
    assert paragraphs[1] == "== Behaviour =="
    assert paragraphs[2].endswith("at night & alone.")
    assert paragraphs[3].startswith("It sleeps") and paragraphs[3].endswith("for food.")
    assert len(paragraphs) == 4  # no infobox, table, image caption, list, references or category
    assert not any(c in p for p in paragraphs for c in "[]{}|<>'")


def test_articles_of_the_eval_text_and_paragraphs_sharing_13_words_are_dropped(wiki):
    other = "\n".join([PROSE, "A second paragraph of this article says something else entirely about ants.",
                       "A third paragraph of this article, about termites and their hills, is kept as well."])
    copied = "Du Fu was a prominent Chinese poet of the Tang dynasty . Along with Li Bai , he is frequently called"
    eval_text = f" = Du Fu = \n\n {copied} the greatest of the Chinese poets . \n"
    articles = [("Du Fu", other), ("Aardvark", other + "\n" + copied.replace(" .", ".").replace(" ,", ",") + " x y z"),
                ("Ants", other)]
    text, report = wiki.build_corpus(articles, eval_text, n=13, min_words=8)
    assert report["dropped_titles"] == ["Du Fu"] and report["dropped_paragraphs"] == 1
    assert report["articles"] == 2 and text.startswith("= Aardvark =") and "= Ants =" in text
    assert "Tang dynasty" not in text
    _, loose = wiki.build_corpus(articles, eval_text, n=40, min_words=8)  # runs longer than the copy: kept
    assert loose["dropped_paragraphs"] == 0


def test_the_shipped_corpus_shares_no_13_word_run_with_the_eval_text(wiki):
    (path,), shipped = distillation_texts("wikipedia")
    assert shipped and path.endswith(SHIPPED_CORPORA["wikipedia"][0])
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(EVAL_TEXT, encoding="utf-8") as f:
        titles, grams = wiki.eval_index(f.read(), 13)
    w = wiki.words(text)
    assert len(w) > 300_000
    assert not any(tuple(w[i:i + 13]) in grams for i in range(len(w) - 12))
    assert not {" ".join(wiki.words(t)) for t in text.split("\n") if t.startswith("= ")} & titles


def test_training_text_names_and_paths(tmp_path):
    files, shipped = distillation_texts(None)
    assert shipped and [os.path.basename(f) for f in files] == list(SHIPPED_CORPORA["teacher"])
    own = tmp_path / "own.txt"
    own.write_text("some text")
    files, shipped = distillation_texts(["wikipedia", str(own)])
    assert not shipped and files[-1] == str(own) and files[0].endswith("wiki_a.txt")
    with pytest.raises(InvalidArgumentError, match="neither a file nor a shipped corpus"):
        distillation_texts("wikipdia")
    with pytest.raises(InvalidArgumentError, match="no training text"):
        distillation_texts([])
