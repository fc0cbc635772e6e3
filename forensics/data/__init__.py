"""Files and formats: image intake, embeddings and their cache, curve files, atomic writes."""
