"""The README's figures are the ones `bench.py --all` wrote: docs/results.md is that run's
results.md, committed beside the figures it drew, and every table row in it (and in the tables of
one-off runs saved beside it) must be quoted in the README word for word. A number edited by hand
in a quoted table fails here."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def table_rows(text):
    return [line.rstrip() for line in text.splitlines() if line.startswith("|")]


def test_every_table_row_of_the_results_is_quoted_in_the_readme():
    results, readme = table_rows(read("docs/results.md")), set(table_rows(read("README.md")))
    assert len(results) > 100  # the whole --all, not a fragment
    missing = [row for row in results if row not in readme]
    assert not missing, f"{len(missing)} rows of docs/results.md are not in the README, first: {missing[0]}"


def test_every_row_of_the_one_off_tables_in_docs_is_quoted_too():
    """Tables of one-off runs outside --all (their command in the README) are saved in docs/ too."""
    readme = set(table_rows(read("README.md")))
    one_offs = sorted(f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md") and n != "results.md")
    assert "docs/elip_600_steps.md" in one_offs
    for name in one_offs:
        rows = table_rows(read(name))
        assert len(rows) > 2 and all(row in readme for row in rows), name


def test_every_picture_the_readme_shows_is_a_png_in_docs():
    pictures = re.findall(r"!\[[^\]]*\]\((docs/[^)]+\.png)\)", read("README.md"))
    assert pictures
    for path in pictures:
        with open(os.path.join(ROOT, path), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", path


def test_the_stated_time_is_the_one_the_results_end_with():
    results, readme = read("docs/results.md"), read("README.md")
    runs, tables = re.search(r"\(([0-9.]+) training runs, ([0-9.]+) tables and figures\)", results).groups()
    time_paragraph = readme[readme.index("**Time:"):]
    time_paragraph = time_paragraph[:time_paragraph.index("\n\n")]
    assert f"{tables} min of tables and figures" in time_paragraph
    assert f"{runs} min, as `timings.json` has them" in time_paragraph
