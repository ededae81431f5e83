"""The answering machine's store of messages (pure stdlib: the edge and the media workers both use it)."""
