"""A knowledge base that changes: what changed since a version (diff), an update trained on the change
with replay (the data selection and the lineage it records), and which versions saw which documents
(audit). Reading any of it loads no model weights."""
