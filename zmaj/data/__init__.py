"""The pre-training data pipeline: a corpus of documents, a byte-level BPE, cached token files, packed rows."""
