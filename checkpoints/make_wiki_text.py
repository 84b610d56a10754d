"""Extracts human-written encyclopedia prose for distillation from a package registry (absl flags).

The shipped distillation corpora are written by the teacher itself; this is the other kind the
distillation issue allows, a corpus fetched from a package registry. gensim's wheel on PyPI
carries, as test data, a shortened English Wikipedia dump of pages 10-30302 (106 articles, the
early "A" titles: Anarchism, Autism, Albedo, ...). This script downloads that wheel with
`pip download --no-deps`, checks the dump's sha256, strips the wiki markup into plain paragraphs
and writes one article per block, headed "= Title =".

Decontamination: the evaluation text (WikiText-2 test) is made of other Wikipedia articles. An
article whose title is one of the evaluation text's is dropped, and so is every paragraph that
shares a run of 13 words with it (both sides lowercased, punctuation dropped), as in the
contamination checks of language-model papers; the counts are printed.

    python checkpoints/make_wiki_text.py --eval_text ../shared/data/wiki.test.raw \
        --out activeflow_jax/data/wiki_a.txt

Text license: Wikipedia's, CC BY-SA 3.0 (see activeflow_jax/data/README.md).
"""

from __future__ import annotations

import bz2
import hashlib
import html
import io
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "activeflow_jax/data/wiki_a.txt", "output text file")
flags.DEFINE_string("eval_text", None, "the evaluation text to decontaminate against (required)")
flags.DEFINE_string("wheel", None, "a gensim wheel already downloaded (default: pip download it)")
flags.DEFINE_integer("ngram", 13, "paragraphs sharing a run of this many words with the evaluation text are dropped")
flags.DEFINE_integer("min_words", 12, "paragraphs with fewer words are dropped (captions, list stubs)")

GENSIM = "gensim==4.4.0"
DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DUMP_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
# sections whose text is not prose
SKIP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                 "sources", "footnotes", "citations", "works cited", "notes and references", "primary sources",
                 "secondary sources", "discography", "filmography", "gallery", "selected works", "works"}


def fetch_dump(wheel: str | None) -> bytes:
    if wheel is None:
        tmp = tempfile.mkdtemp(prefix="gensim-wheel-")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "-d", tmp, GENSIM], check=True)
        wheel = os.path.join(tmp, next(n for n in os.listdir(tmp) if n.endswith(".whl")))
    with zipfile.ZipFile(wheel) as z:
        data = z.read(DUMP)
    digest = hashlib.sha256(data).hexdigest()
    if digest != DUMP_SHA256:
        raise SystemExit(f"{DUMP} in {wheel} has sha256 {digest}, expected {DUMP_SHA256}")
    return bz2.decompress(data)


def pages(xml_bytes: bytes):
    """(title, wikitext) of every article that is not a redirect."""
    for _, el in ET.iterparse(io.BytesIO(xml_bytes)):
        if el.tag.rsplit("}", 1)[-1] != "page":
            continue
        ns = next((c.text for c in el.iter() if c.tag.endswith("}ns")), "0")
        title = next(c.text for c in el.iter() if c.tag.endswith("}title"))
        text = next((c.text for c in el.iter() if c.tag.endswith("}text")), None) or ""
        el.clear()
        if ns == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
            yield title, text


def _drop_nested(text: str, open_: str, close: str) -> str:
    """Removes every outermost open_ ... close span (templates and tables nest)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _links(text: str) -> str:
    """[[target|label]] -> label, [[target]] -> target; file, image, category and interlanguage
    links (whose captions may hold links themselves) are dropped whole."""
    out, i = [], 0
    while True:
        j = text.find("[[", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        depth, k = 0, j
        while k < len(text):  # the matching ]]
            if text.startswith("[[", k):
                depth, k = depth + 1, k + 2
            elif text.startswith("]]", k):
                depth, k = depth - 1, k + 2
                if depth == 0:
                    break
            else:
                k += 1
        inner = text[j + 2:k - 2]
        target = inner.split("|", 1)[0].strip()
        if ":" in target and not target.startswith(":"):
            pass  # File:, Image:, Category:, de:, ... : no prose
        else:
            out.append(_links(inner.rsplit("|", 1)[-1]))
        i = k


def clean(wikitext: str, min_words: int = 12) -> list[str]:
    """Plain paragraphs and "== Section ==" headings of one article's wikitext."""
    t = html.unescape(wikitext)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>/]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = re.sub(r"<(math|gallery|timeline|syntaxhighlight|source|pre|score|table)[^>]*>.*?</\1>", "", t,
               flags=re.S | re.I)
    t = _drop_nested(t, "{{", "}}")
    t = _drop_nested(t, "{|", "|}")
    t = _links(t)
    t = re.sub(r"\[(?:https?|ftp)://\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[(?:https?|ftp)://\S+\]", "", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"'{2,}", "", t)
    out, skipping = [], False
    for line in t.split("\n"):
        line = line.strip()
        m = re.fullmatch(r"(={2,})\s*(.*?)\s*\1", line)
        if m:
            skipping = m.group(2).lower() in SKIP_SECTIONS
            if not skipping and m.group(2):
                out.append(f"{m.group(1)} {m.group(2)} {m.group(1)}")
            continue
        if skipping or not line or line[0] in "*#:;|!{}":
            continue
        line = re.sub(r"\s+", " ", re.sub(r"\(\s*[,;]?\s*\)", "", line)).strip()
        if len(line.split()) >= min_words:
            out.append(line)
    while out and out[-1].startswith("=="):  # a heading left with no paragraph under it
        out.pop()
    return [p for i, p in enumerate(out) if not (p.startswith("==") and i + 1 < len(out) and out[i + 1].startswith("=="))]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def eval_index(eval_text: str, n: int) -> tuple[set[str], set[tuple[str, ...]]]:
    """The evaluation text's article titles (WikiText's " = Title = " lines) and its n-word runs."""
    titles = {" ".join(words(m)) for m in re.findall(r"^ = ([^=].*?) = \s*$", eval_text, flags=re.M)}
    w = words(eval_text)
    return titles, {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def build_corpus(articles, eval_text: str, n: int = 13, min_words: int = 12) -> tuple[str, dict]:
    """The corpus text of (title, wikitext) articles, decontaminated against eval_text, and a report."""
    titles, grams = eval_index(eval_text, n)
    out, report = [], {"dropped_titles": [], "dropped_paragraphs": 0, "characters": 0}
    for title, wikitext in articles:
        if " ".join(words(title)) in titles:
            report["dropped_titles"].append(title)
            continue
        paragraphs = []
        for p in clean(wikitext, min_words):
            w = words(p)
            if any(tuple(w[i:i + n]) in grams for i in range(len(w) - n + 1)):
                report["dropped_paragraphs"] += 1
                continue
            paragraphs.append(p)
        body = [p for i, p in enumerate(paragraphs)  # headings whose paragraphs were all dropped
                if not (p.startswith("==") and (i + 1 == len(paragraphs) or paragraphs[i + 1].startswith("==")))]
        if sum(not p.startswith("==") for p in body) >= 3:  # stubs and lists say little
            report["characters"] += sum(len(p) for p in body)
            out.append(f"= {title} =\n\n" + "\n\n".join(body))
    report["articles"] = len(out)
    return "\n\n\n".join(out) + "\n", report


def main(argv):
    del argv
    if not FLAGS.eval_text:
        raise SystemExit("--eval_text is required: the evaluation text to decontaminate against")
    with open(FLAGS.eval_text, encoding="utf-8", newline="") as f:
        eval_text = f.read()
    text, report = build_corpus(pages(fetch_dump(FLAGS.wheel)), eval_text, FLAGS.ngram, FLAGS.min_words)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{report['articles']} articles, {report['characters']} characters -> {FLAGS.out}; dropped: titles in "
          f"the evaluation text {report['dropped_titles']}, {report['dropped_paragraphs']} paragraphs sharing a "
          f"{FLAGS.ngram}-word run with it")


if __name__ == "__main__":
    app.run(main)
