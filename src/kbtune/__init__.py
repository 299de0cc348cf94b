"""kbtune: fine-tune a local causal LM on a Chroma knowledge base; sessions and versions in MLflow."""

__version__ = "0.1.0"
