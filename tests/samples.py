"""Four short passages on unrelated topics and a query only one of them answers (shared by tests)."""

from __future__ import annotations

from rerank.records import Passage

PASSAGES = [
    Passage(
        id="eiffel",
        title="Eiffel Tower",
        text="The Eiffel Tower is a wrought-iron lattice tower in Paris, built in 1889.",
    ),
    Passage(id="photo", text="Photosynthesis converts light energy into chemical energy stored in sugars."),
    Passage(
        id="python",
        text="Python is a programming language created by Guido van Rossum and first released in 1991.",
    ),
    Passage(
        id="vaccine",
        text="Vaccines train the immune system to recognise a pathogen without causing the disease.",
    ),
]
QUERY = "who created the python programming language"
