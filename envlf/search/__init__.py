"""Search: the gallery index on disk (index), approximate nearest neighbours (ann), the re-rank
score that search, evaluate and the app all order by (rerank), and the query engine the app
and CLI call (engine)."""
