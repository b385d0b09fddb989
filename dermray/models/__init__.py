"""What is learned and exported, each kind behind a registry: frozen backbones (backbones), the
embedding Parquet contract (embeddings), feature specs (features), head families (heads/),
decision policies (policies) and the exported model bundle (bundle). No Ray here."""
