"""Did the model learn the knowledge base: fact probes built from its documents, and their scoring."""
