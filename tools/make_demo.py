"""Rebuild the bundled demo corpus from the staging copies of its public sources (maintainers only).

    python tools/make_demo.py --staging /path/to/staging/data

Never run by lmselect itself: the product reads only the files this script writes into ``src/lmselect/bundled/demo``
(package data; ``data/demo`` in a clone links there). The slicing is
deterministic (fixed seeds and character budgets); SOURCE.md documents every source, its licence and the slice.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src" / "lmselect" / "bundled" / "demo"  # the output folder
SEED = 20240601
MAX_DOC_CHARS = 40_000  # skip a few huge records (HTML mail dumps, long logs) so no single file dominates a source
BUDGET = {  # characters per source in the pool (~4.2 characters per BPE token)
    "wikipedia": 1_600_000,
    "speeches": 900_000,
    "reviews": 900_000,
    "email_ham": 900_000,
    "email_spam": 900_000,
    "forum": 450_000,
    "news": 400_000,
    "web": 400_000,
}
N_CLEAN_VAL = 300
N_LAMBADA = 500
MASC_NEWS = re.compile(r"wsj_|nyt|NYTnewswire")
MASC_FORUM = re.compile(r"blog|jokes|lists-|tweets|Acephalous|Effing")


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def take(records: list[dict], budget: int, seed: int, max_chars: int = MAX_DOC_CHARS) -> list[dict]:
    """A seeded random subset of records whose texts total about ``budget`` characters."""
    recs = [r for r in records if 50 <= len(r["text"]) <= max_chars]
    random.Random(seed).shuffle(recs)
    out, used = [], 0
    for r in recs:
        if used >= budget:
            break
        out.append(r)
        used += len(r["text"])
    return out


def write_gz(path: Path, records: list[dict]) -> None:
    # mtime=0 keeps the .gz bytes identical across rebuilds
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--staging", required=True, type=Path, help="folder with wikipedia_sample/, nltk_corpora/, ...")
    args = ap.parse_args()
    s = args.staging
    corpus: dict[str, list[dict]] = {}

    # Wikipedia: every 10th article (index 9, 19, ...) is held out entirely for clean_val; the pool slice comes from
    # the others, so no clean_val paragraph appears in the pool.
    wiki = read_jsonl(s / "wikipedia_sample" / "enwiki_sample.jsonl")
    held = [a for i, a in enumerate(wiki) if i % 10 == 9]
    rest = [a for i, a in enumerate(wiki) if i % 10 != 9]
    corpus["wikipedia"] = [
        {"id": f"enwiki:{a['title']}", "source": "wikipedia", "text": a["text"]}
        for a in take([dict(a) for a in rest], BUDGET["wikipedia"], SEED, max_chars=150_000)  # articles are long
    ]
    paras = [
        {"id": f"enwiki:{a['title']}:p{j}", "source": "wikipedia", "text": p.strip()}
        for a in held
        for j, p in enumerate(a["text"].split("\n\n"))
        if 200 <= len(p.strip()) <= 3000
    ]
    clean_val = take(paras, 10**9, SEED)[:N_CLEAN_VAL]

    nltk = read_jsonl(s / "nltk_corpora" / "nltk_english_corpora.jsonl.gz")

    def nltk_recs(pred, source):
        return [{"id": f"{r['corpus']}/{r['file']}" + (f"#{r['part']}" if "part" in r else ""), "source": source, "text": r["text"]}
                for r in nltk if pred(r)]

    corpus["speeches"] = take(nltk_recs(lambda r: r["corpus"] in ("nltk/state_union", "nltk/inaugural"), "speeches"), BUDGET["speeches"], SEED)
    corpus["reviews"] = take(nltk_recs(lambda r: r["corpus"] == "nltk/movie_reviews", "reviews"), BUDGET["reviews"], SEED)
    masc = lambda pat: (lambda r: r["corpus"] == "nltk/masc_tagged" and bool(pat.search(r["file"])))  # noqa: E731
    corpus["forum"] = take(nltk_recs(masc(MASC_FORUM), "forum"), BUDGET["forum"], SEED)

    web = read_jsonl(s / "web_cc_samples" / "cc_c4_samples.jsonl")
    guardian = [r for r in web if "theguardian" in r["source"]]
    others = [r for r in web if "theguardian" not in r["source"]]
    news = nltk_recs(masc(MASC_NEWS), "news") + [
        {"id": f"c4-100-domains/{r['id']}", "source": "news", "text": r["text"]} for r in guardian
    ]
    corpus["news"] = take(news, BUDGET["news"], SEED)
    corpus["web"] = take(
        [{"id": str(r["id"]) if r.get("id") else f"c4:{i}", "source": "web", "text": r["text"]} for i, r in enumerate(others)],
        BUDGET["web"], SEED,
    )

    mail = read_jsonl(s / "spamassassin" / "spamassassin_bodies.jsonl.gz")
    as_rec = lambda r, src: {"id": f"spamassassin/{r['split_dir']}/{r['file']}", "source": src, "text": r["text"]}  # noqa: E731
    corpus["email_ham"] = take([as_rec(r, "email_ham") for r in mail if not r["is_spam"]], BUDGET["email_ham"], SEED)
    corpus["email_spam"] = take([as_rec(r, "email_spam") for r in mail if r["is_spam"]], BUDGET["email_spam"], SEED)

    out = HERE / "corpus"
    out.mkdir(exist_ok=True)
    for name, recs in corpus.items():
        write_gz(out / f"{name}.jsonl.gz", recs)
        print(f"{name:11s} {len(recs):5d} docs {sum(len(r['text']) for r in recs):9d} chars")

    with open(HERE / "clean_val.jsonl", "w", encoding="utf-8") as f:
        for r in clean_val:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    lam = read_jsonl(s / "lambada" / "lambada_test.jsonl")[:N_LAMBADA]
    # Two disjoint roles: the report half (first, it also holds the 40 passages of the bundled lambada_openai task
    # slice, which is reported too) and the selection half (the only LAMBADA text a selection method may see).
    half = len(lam) // 2
    for name, part in (("lambada_report.jsonl", lam[:half]), ("lambada_select.jsonl", lam[half:])):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n")
    print(f"clean_val {len(clean_val)} paragraphs from {len(held)} held-out articles; lambada {len(lam)} passages "
          f"-> report {half} + selection {len(lam) - half}")


if __name__ == "__main__":
    main()
