"""Relevance labels: the feedback CSV store (store), TREC qrels / JSONL exports (exports) and the
queries worth labelling next (suggest)."""
