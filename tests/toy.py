"A two-chapter toy book: the runner's behaviour in seconds, without the real chapters' cost."

from pathlib import Path

import nbformat

from llmbook.book import Chapter, chapter_notebook

TOY_BOOK = (Chapter(1, "toy_a", "Toy A", "01_toy_a", ("a.txt",)), Chapter(2, "toy_b", "Toy B", "02_toy_b", ("b.txt",)))
WRITE_A = 'atomic_write_text(run.artifact("a.txt"), "tokens: 3")'
READ_A_WRITE_B = (
    'n = int(run.artifact("a.txt").read_text().split()[1])\natomic_write_text(run.artifact("b.txt"), str(n))'
)


def write_toy_book(nbs: Path, *second_chapter_body: str):
    "Write both toy notebooks into `nbs`; the second runs `second_chapter_body` before writing b.txt."
    nbs.mkdir(parents=True, exist_ok=True)
    nbformat.write(chapter_notebook(TOY_BOOK[0], [WRITE_A], TOY_BOOK), nbs / "01_toy_a.ipynb")
    nbformat.write(
        chapter_notebook(TOY_BOOK[1], [*second_chapter_body, READ_A_WRITE_B], TOY_BOOK), nbs / "02_toy_b.ipynb"
    )
