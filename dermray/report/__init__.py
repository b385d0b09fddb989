"""What a person reads: metrics and the report (evaluate), the HTML dashboard (dashboard), the
embedding map, and explanations (explain). No Ray here."""
