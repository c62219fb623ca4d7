"""The results are measured, never typed: every table row of docs/RESULTS.md is a row that a command
wrote (docs/results.md, the harness's output, or a one-off table saved beside it), every row of the
harness's output is shown, and the README stays a guide that links to them."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def table_rows(text):
    return [line.rstrip() for line in text.splitlines() if line.startswith("|")]


def one_offs():
    return sorted(f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs"))
                  if n.endswith(".md") and n not in ("results.md", "RESULTS.md"))


def test_every_row_of_the_results_was_written_by_a_command():
    """Catches a number edited by hand in docs/RESULTS.md: each of its rows must be in the
    harness's output or in a saved one-off table."""
    written = set(table_rows(read("docs/results.md")))
    for name in one_offs():
        written |= set(table_rows(read(name)))
    shown = table_rows(read("docs/RESULTS.md"))
    assert len(shown) > 100
    typed = [row for row in shown if row not in written]
    assert not typed, f"{len(typed)} rows of docs/RESULTS.md were written by no command, first: {typed[0]}"


def test_every_table_the_harness_and_the_one_offs_wrote_is_shown():
    shown = set(table_rows(read("docs/RESULTS.md")))
    for name in ["docs/results.md", *one_offs()]:
        missing = [row for row in table_rows(read(name)) if row not in shown]
        assert not missing, f"{name}: {len(missing)} rows not in docs/RESULTS.md, first: {missing[0]}"


def test_the_stated_time_is_the_one_the_results_end_with():
    results = read("docs/results.md")
    runs, tables = re.search(r"\(([0-9.]+) training runs, ([0-9.]+) tables and figures\)", results).groups()
    assert f"({runs} training runs, {tables} tables and figures)" in read("docs/RESULTS.md")
    total = re.search(r"each timed when it last ran: ([0-9.]+) min", results).group(1)
    assert f"about {float(total) / 60:.1f} hours" in read("README.md")


def test_the_readme_is_a_guide_whose_links_and_pictures_exist():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 350
    slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
             for h in re.findall(r"(?m)^#+ (.+)$", read("docs/RESULTS.md"))}
    anchors = re.findall(r"\(docs/RESULTS\.md#([^)]+)\)", readme)
    assert anchors and all(a in slugs for a in anchors), set(anchors) - slugs
    pictures = re.findall(r"!\[[^\]]*\]\((docs/[^)]+\.png)\)", readme)
    pictures += ["docs/" + p for p in re.findall(r"!\[[^\]]*\]\(([^)/]+\.png)\)", read("docs/RESULTS.md"))]
    assert len(pictures) >= 6
    for path in pictures:
        with open(os.path.join(ROOT, path), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
