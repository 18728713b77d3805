"""Copy the committed benchmark tables (benchmarks/results/<name>.md) into the README and the
documentation pages, between the markers <!-- name --> and <!-- /name -->.

    python benchmarks/update_readme.py"""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    docs = os.path.join(ROOT, "docs")
    for path in [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md")
    ):
        update(path)


def update(path):
    with open(path) as f:
        text = f.read()
    for name in re.findall(r"<!-- ([a-z0-9_]+) -->", text):
        with open(os.path.join(ROOT, "benchmarks", "results", name + ".md")) as f:
            table = f.read().strip()
        text = re.sub(
            rf"<!-- {name} -->.*?<!-- /{name} -->",
            lambda _: f"<!-- {name} -->\n{table}\n<!-- /{name} -->",
            text,
            flags=re.S,
        )
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
