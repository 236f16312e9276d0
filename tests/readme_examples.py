"""The README's usage examples, verbatim, so that tests run exactly what the README shows.

``PYTHON`` and ``LANGCHAIN`` run in one namespace (the second uses ``pipe`` and ``passages`` of the first);
``CLI`` runs with bash in an empty folder.
"""

from __future__ import annotations

PYTHON = """\
from rerank import Passage, Pipeline

pipe = Pipeline.from_config("default", generator=None)  # the shipped default, reranking only

passages = [
    Passage(id="p1", text="Hamlet is a tragedy written by William Shakespeare around 1600."),
    Passage(id="p2", text="The Eiffel Tower in Paris was completed in 1889."),
    Passage(id="p3", text="Christopher Marlowe wrote Doctor Faustus, a play about a scholar."),
]
pipe.index(passages)  # BM25 + dense, in memory (index_dir= loads a saved one)
hits = pipe.retrieve("Who wrote Hamlet?")  # the first stage: Hits, best first, with their scores
ranked = pipe.rerank("Who wrote Hamlet?", hits)  # or your own candidates: Hits, Passages or strings
for item in ranked.items:
    print(item.rank, item.passage.id, f"{item.score:+.2f}", "prompt slot", item.prompt_position)

answer = pipe.run("Who wrote Hamlet?")  # retrieve -> rerank -> prune/order -> generate
print([p.id for p in answer.passages_used], answer.text)  # text is None with generator=None
"""

LANGCHAIN = """\
from langchain_core.documents import Document
from rerank.integrations.langchain import AttnRerankCompressor, AttnRerankRetriever

retriever = AttnRerankRetriever(pipeline=pipe)  # retrieve -> rerank -> prune, as LangChain Documents
docs = retriever.invoke("Who wrote Hamlet?")  # or: await retriever.ainvoke(...)
print([(d.metadata["id"], round(d.metadata["relevance_score"], 2)) for d in docs])

# Rerank and prune the documents of any other retriever; the documents passed in stay untouched.
compressor = AttnRerankCompressor(pipeline=pipe, top_n=2)
other_docs = [Document(page_content=p.text, metadata={"source": p.id}) for p in passages]
best = compressor.compress_documents(other_docs, "Who wrote Hamlet?")
print([(d.metadata["source"], round(d.metadata["relevance_score"], 2)) for d in best])
"""

CLI = """\
cat > corpus.jsonl <<'EOF'
{"id": "p1", "title": "Hamlet", "text": "Hamlet is a tragedy written by William Shakespeare."}
{"id": "p2", "title": "Eiffel Tower", "text": "The Eiffel Tower in Paris was completed in 1889."}
{"id": "p3", "title": "Doctor Faustus", "text": "Christopher Marlowe wrote Doctor Faustus."}
EOF
attn-rerank index build --corpus corpus.jsonl --out my_index --config default

cat > queries.jsonl <<'EOF'
{"qid": "q1", "query": "Who wrote Hamlet?"}
{"query": {"qid": "q2", "text": "When was the Eiffel Tower built?"}, "candidates": [{"docid": "p2", "score": 7.1, "doc": "The Eiffel Tower in Paris was completed in 1889."}, {"docid": "p1", "score": 3.2, "doc": {"title": "Hamlet", "contents": "Hamlet is a tragedy."}}]}
EOF
attn-rerank run --config default --index my_index --input queries.jsonl \\
    --output results.jsonl --trec-run results.trec     # rerun the same command to resume
cat results.trec                                   # qid Q0 docid rank score attn-rerank
"""  # noqa: E501 - a JSON line of the example is longer than the limit
