"""Rebuild rt_sentiment.tsv from vaderSentiment 3.3.2's sdist (how the file in this folder was made; run once).

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/vader
    python build_subset.py /tmp/vader/vaderSentiment-3.3.2.tar.gz > rt_sentiment.tsv

Selection: snippets whose mean human rating is >= +1.0 (positive) or <= -1.0 (negative) on VADER's -4..+4 scale,
duplicates dropped, shuffled with random.Random(0), then 1000 + 1000 for training and 250 + 250 held out.
"""

import io
import random
import sys
import tarfile

SOURCE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
THRESHOLD = 1.0
PER_CLASS = {"train": 1000, "test": 250}


def read_snippets(sdist_path):
    with tarfile.open(sdist_path) as sdist:
        inner = io.BytesIO(sdist.extractfile(SOURCE).read())
    with tarfile.open(fileobj=inner) as resources:
        text = resources.extractfile(MEMBER).read().decode("utf-8")
    for line in text.splitlines():
        snippet_id, rating, snippet = line.split("\t")
        yield int(snippet_id), float(rating), " ".join(snippet.split())


def main(sdist_path):
    by_label, seen = {"positive": [], "negative": []}, set()
    for snippet_id, rating, snippet in read_snippets(sdist_path):
        if abs(rating) < THRESHOLD or snippet in seen:
            continue
        seen.add(snippet)
        by_label["positive" if rating > 0 else "negative"].append((snippet_id, rating, snippet))
    rng = random.Random(0)
    print("split\tlabel\trating\tid\ttext")
    for label, rows in by_label.items():
        rng.shuffle(rows)
        start = 0
        for split, count in PER_CLASS.items():
            for snippet_id, rating, snippet in rows[start : start + count]:
                print(f"{split}\t{label}\t{rating:.3f}\t{snippet_id}\t{snippet}")
            start += count


if __name__ == "__main__":
    main(sys.argv[1])
